"""Programs written for torch.distributed.rpc (examples/torch/) run unedited on Tether: under
`python -m tether.run` (spawning their own workers, or launched by torchrun) and under
`python -m tether.sim`; each prints its RPC module, which must be Tether's. What Tether lacks
fails naming it, and bad arguments get clear errors."""
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import unittest

import torch  # noqa: F401

from tether import run as tether_run

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples", "torch")
PARAMETER_SERVER = os.path.join(EXAMPLES, "parameter_server.py")
MODEL_PARALLEL = os.path.join(EXAMPLES, "torchrun_model_parallel.py")
# Each run starts a few processes that import torch: seconds each, minutes on a loaded machine.
TIMEOUT = 600


def python(*args, cwd=None, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=cwd, env=dict(os.environ, **env))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TetherRunTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp(dir=os.environ.get("TEST_TMPDIR"))

    def test_spawning_parameter_server_runs_on_tether(self):
        p = python("-m", "tether.run", PARAMETER_SERVER, "--world-size=3", "--steps=4",
                   cwd=self.tmp)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        lines = [line for line in p.stdout.splitlines() if line.startswith("trainer")]
        # Both trainers are spawned processes: they re-imported the script with Tether's names.
        self.assertEqual(len(lines), 2, p.stdout)
        for line in lines:
            self.assertIn("rpc=tether.rpc autograd=tether.autograd", line)

    def test_torchrun_launches_workers_on_tether(self):
        # Debian's torchrun on Python 3.11 needs --redirects/--tee (PyTorch 1.13's Std flags).
        p = python("-m", "torch.distributed.run", "--nproc_per_node=2",
                   f"--master_port={free_port()}", "--redirects", "1", "--tee", "1",
                   "-m", "tether.run", MODEL_PARALLEL, "4", cwd=self.tmp)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("rank 0: rpc=tether.rpc losses", p.stdout)

    def test_what_tether_lacks_fails_naming_it(self):
        for line, error in (
            ("import torch.distributed.rpc._utils",
             "ModuleNotFoundError: No module named 'torch.distributed.rpc._utils' "
             "(Tether has no tether.rpc._utils)"),
            ("from torch.distributed.rpc import _utils",
             "ImportError: cannot import name '_utils' from 'tether.rpc'"),
        ):
            script = os.path.join(self.tmp, "uses_utils.py")
            with open(script, "w") as f:
                f.write(f"import torch.distributed.rpc as rpc\nprint(rpc.__name__)\n{line}\n")
            p = python("-m", "tether.run", script, cwd=self.tmp)
            self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
            self.assertEqual(p.stdout.strip(), "tether.rpc")
            self.assertIn(error, p.stderr)

    def test_script_sees_its_arguments_and_directory_and_exit_status(self):
        script = os.path.join(self.tmp, "args.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent("""\
                import sys
                print(repr(sys.argv), sys.path[0] == __import__("os").path.dirname(__file__),
                      __name__)
                sys.exit(3)
            """))
        p = python("-m", "tether.run", script, "a", "--b", cwd="/")
        self.assertEqual(p.returncode, 3, p.stderr)
        self.assertEqual(p.stdout.strip(), f"[{script!r}, 'a', '--b'] True __main__")

    def test_bad_arguments_exit_2_with_a_message(self):
        p = python("-m", "tether.run", os.path.join(self.tmp, "missing.py"))
        self.assertEqual(p.returncode, 2)
        self.assertIn("tether.run: no such script:", p.stderr)

    def test_parse(self):
        parse, bad = tether_run.parse, tether_run.UsageError
        self.assertEqual(parse([PARAMETER_SERVER, "--steps=3"]),
                         ("path", PARAMETER_SERVER, ["--steps=3"]))
        self.assertEqual(parse(["--", PARAMETER_SERVER, "-m"]), ("path", PARAMETER_SERVER, ["-m"]))
        self.assertEqual(parse(["-m", "pkg.mod", "x"]), ("module", "pkg.mod", ["x"]))
        for argv, message in (([], "usage"), (["--"], "no script after --"),
                              (["-m"], "-m needs a module name"),
                              (["--fast", "x.py"], "unknown option --fast"),
                              ([self.tmp], "is a directory, not a Python script"),
                              ([os.path.join(self.tmp, "nope.py")], "no such script")):
            with self.assertRaisesRegex(bad, message):
                parse(argv)


class TetherSimTest(unittest.TestCase):
    def run_sim(self, *args):
        return python("-m", "tether.sim", *args, PYTHONHASHSEED="0")

    def test_torchrun_program_explores_clean(self):
        p = self.run_sim(MODEL_PARALLEL, "--world-size", "3", "--seeds", "1..2", "--faults",
                         "delay=0..5ms,dup=0.05,reorder=0.2", "--quiet", "--show-output", "--", "3")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("explored seeds=2 failed=0", p.stdout)
        self.assertEqual(p.stdout.count("rank 0: rpc=tether.rpc losses"), 2, p.stdout)

    def test_spawning_program_is_refused(self):
        p = self.run_sim(PARAMETER_SERVER, "--world-size", "3", "--seeds", "1", "--quiet")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("SimulationError: tether.sim: worker code started a process", p.stdout)
        self.assertIn("run this program for real: python -m tether.run SCRIPT", p.stdout)
        self.assertIn("--as-main", p.stdout)  # The replay command runs it the same way.

    def test_bad_script(self):
        p = self.run_sim(HERE, "--world-size", "2")
        self.assertEqual(p.returncode, 1)
        self.assertIn("is a directory, not a Python script", p.stderr)
        p = self.run_sim(os.path.join(HERE, "correct.py"), "--world-size", "2", "--", "x")
        self.assertEqual(p.returncode, 1)
        self.assertIn("defines main(rank, world_size): add --as-main", p.stderr)


if __name__ == "__main__":
    unittest.main()
