"""tools/wheel: a wheel built from the suite's extension installs into a fresh venv, where a
two-worker program, `python -m tether.run` and `python -m tether.sim` run from outside the source
tree with no PYTHONPATH, importing tether from the venv (never from the source tree)."""
import base64
import email.parser
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import unittest
import zipfile

RUNFILES = os.path.join(os.environ["TEST_SRCDIR"], os.environ["TEST_WORKSPACE"])
TOOL = os.path.join(RUNFILES, "tools", "wheel")
EXTENSION = os.path.join(RUNFILES, "python", "_C.so")
PYTHON = "/usr/bin/python3"  # Debian's, with torch: the interpreter the wheel is built for.
# Creating a venv, pip, and processes that import torch: seconds each, minutes on a busy machine.
TIMEOUT = 600

TWO_WORKERS = """\
import os
import sys

import torch
import torch.multiprocessing as mp

import tether
import tether.rpc as rpc


def worker(rank, init_method, out):
    options = rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=120)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    if rank == 0:
        result = rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 2))
        with open(out, "w") as f:
            print(result.tolist(), tether.__file__, tether._C.__file__, file=f)
    rpc.shutdown()


if __name__ == "__main__":
    tmp = sys.argv[1]
    print("parent", tether.__file__, tether._C.__file__)
    mp.spawn(worker, args=("file://" + os.path.join(tmp, "rendezvous"),
                           os.path.join(tmp, "result")), nprocs=2)
"""

UNMODIFIED = """\
import os
import sys

import torch
import torch.distributed.rpc as rpc
import torch.multiprocessing as mp


def worker(rank, init_method):
    options = rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=120)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=2, rpc_backend_options=options)
    if rank == 1:
        result = rpc.rpc_sync("worker0", torch.add, args=(torch.ones(2), 3))
        print("child", result.tolist(), rpc.__name__, sys.modules[rpc.rpc_sync.__module__].__file__,
              flush=True)
    rpc.shutdown()


if __name__ == "__main__":
    mp.spawn(worker, args=("file://" + os.path.join(sys.argv[1], "rendezvous"),), nprocs=2)
"""

SIMULATED = """\
import torch
import tether.rpc as rpc


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        result = rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 4))
        print("sim", result.tolist(), rpc.__file__)
    rpc.shutdown()
"""


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


class WheelTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))
        # What the venv's processes see: nothing that points at the source tree or the runfiles.
        cls.env = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONPATH", "TETHER_C_EXTENSION", "RUNFILES_DIR",
                                "RUNFILES_MANIFEST_FILE", "PYTHONSAFEPATH")}
        cls.env.update(HOME=cls.tmp, PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
                       PYTHONHASHSEED="0")
        built = cls.run_cmd([PYTHON, TOOL, "--extension", EXTENSION, "--out",
                             os.path.join(cls.tmp, "dist")])
        wheels = os.listdir(os.path.join(cls.tmp, "dist"))
        assert len(wheels) == 1, (wheels, built.stderr)
        cls.wheel = os.path.join(cls.tmp, "dist", wheels[0])
        cls.venv = os.path.join(cls.tmp, "env")
        cls.run_cmd([PYTHON, "-m", "venv", "--system-site-packages", cls.venv])
        cls.run_cmd([os.path.join(cls.venv, "bin", "pip"), "install", "--no-index", cls.wheel])
        cls.site = os.path.join(cls.venv, "lib", f"python{sys.version_info.major}."
                                f"{sys.version_info.minor}", "site-packages", "tether")
        # Programs live outside the source tree and the runfiles.
        cls.work = os.path.join(cls.tmp, "elsewhere")
        os.makedirs(cls.work)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def run_cmd(cls, cmd, cwd=None):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=cls.env,
                           cwd=cwd or cls.tmp)
        if p.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited with {p.returncode}:\n{p.stdout}\n"
                                 f"{p.stderr}")
        return p

    def venv_python(self, *args):
        return self.run_cmd([os.path.join(self.venv, "bin", "python"), *args], cwd=self.work)

    def write(self, name, text):
        path = os.path.join(self.work, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def assertInVenv(self, path):  # noqa: N802
        self.assertTrue(os.path.realpath(path).startswith(os.path.realpath(self.site) + os.sep),
                        f"{path} is not the venv's tether ({self.site})")

    def test_wheel_name_contents_and_metadata(self):
        py = f"cp{sys.version_info.major}{sys.version_info.minor}"
        self.assertRegex(os.path.basename(self.wheel),
                         rf"^tether-\d+\.\d+\.\d+-{py}-{py}-linux_x86_64\.whl$")
        version = os.path.basename(self.wheel).split("-")[1]
        dist_info = f"tether-{version}.dist-info"
        with zipfile.ZipFile(self.wheel) as zf:
            names = set(zf.namelist())
            for name in ("tether/__init__.py", "tether/_C.so", "tether/_C.pyi", "tether/py.typed",
                         "tether/_aliases.py", "tether/run.py", "tether/rpc/__init__.py",
                         "tether/sim/__main__.py", "tether/autograd/__init__.py",
                         "tether/optim/__init__.py"):
                self.assertIn(name, names)
            self.assertFalse([n for n in names if "__pycache__" in n or n.endswith(".pyc")])
            with open(EXTENSION, "rb") as f:
                self.assertEqual(zf.read("tether/_C.so"), f.read())
            meta = email.parser.Parser().parsestr(zf.read(f"{dist_info}/METADATA").decode())
            self.assertEqual(meta["Name"], "tether")
            self.assertEqual(meta["Version"], version)
            self.assertEqual(meta.get_all("Requires-Dist"),
                             [f"torch=={importlib.metadata.version('torch')}"])
            wheel = zf.read(f"{dist_info}/WHEEL").decode()
            self.assertIn("Root-Is-Purelib: false", wheel)
            self.assertIn(f"Tag: {py}-{py}-linux_x86_64", wheel)
            record = {}
            for line in zf.read(f"{dist_info}/RECORD").decode().splitlines():
                name, digest, size = line.rsplit(",", 2)
                record[name] = (digest, size)
            self.assertEqual(set(record), names)
            self.assertEqual(record[f"{dist_info}/RECORD"], ("", ""))
            for name in names - {f"{dist_info}/RECORD"}:
                data = zf.read(name)
                self.assertEqual(record[name], (record_hash(data), str(len(data))), name)

    def test_two_workers_from_the_venv(self):
        script = self.write("two_workers.py", TWO_WORKERS)
        out = tempfile.mkdtemp(dir=self.tmp)
        p = self.venv_python(script, out)
        parent = p.stdout.split()
        self.assertEqual(parent[0], "parent", p.stdout)
        self.assertInVenv(parent[1])
        self.assertInVenv(parent[2])
        with open(os.path.join(out, "result")) as f:
            result = f.read()
        self.assertTrue(result.startswith("[3.0, 3.0] "), result)
        for path in result.split()[2:]:  # tether and tether._C in the spawned worker
            self.assertInVenv(path)

    def test_tether_run_from_the_venv(self):
        script = self.write("unmodified.py", UNMODIFIED)
        p = self.venv_python("-m", "tether.run", script, tempfile.mkdtemp(dir=self.tmp))
        line = [x for x in p.stdout.splitlines() if x.startswith("child")]
        self.assertEqual(len(line), 1, p.stdout + p.stderr)
        words = line[0].split()
        self.assertEqual(words[1:4], ["[4.0,", "4.0]", "tether.rpc"])
        self.assertInVenv(words[4])

    def test_tether_sim_from_the_venv(self):
        script = self.write("simulated.py", SIMULATED)
        p = self.venv_python("-m", "tether.sim", script, "--world-size", "2", "--seeds", "1")
        line = [x for x in p.stdout.splitlines() if x.startswith("sim [5.0, 5.0] ")]
        self.assertEqual(len(line), 1, p.stdout + p.stderr)
        self.assertInVenv(line[0].split()[-1])
        self.assertIn("explored seeds=1 failed=0", p.stdout)

    def test_bad_extension_is_refused(self):
        not_elf = self.write("not_an_extension.so", "text")
        for path, message in ((os.path.join(self.tmp, "missing.so"), "no extension at"),
                              (self.tmp, "(a directory)"),
                              (not_elf, "is not a shared library")):
            p = subprocess.run([PYTHON, TOOL, "--extension", path, "--out",
                                os.path.join(self.tmp, "bad")], capture_output=True, text=True,
                               timeout=TIMEOUT, env=self.env)
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertIn(message, p.stderr)
            self.assertFalse(os.path.exists(os.path.join(self.tmp, "bad")))


if __name__ == "__main__":
    unittest.main()
