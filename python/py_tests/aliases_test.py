"""tether._aliases: PyTorch's RPC names served by Tether's modules, in this process and in the
processes it spawns."""
import multiprocessing
import subprocess
import sys
import unittest

import torch
import torch.distributed

import tether.autograd
import tether.optim
import tether.rpc
from tether import _aliases


def _child_report(queue) -> None:
    import torch.distributed.rpc as rpc

    queue.put((rpc.__name__, sys.modules["torch.distributed.autograd"].__name__))


class BeforeInstallTest(unittest.TestCase):
    def test_check_says_what_is_wrong(self):
        # In a fresh process: this one installs them below.
        p = subprocess.run([sys.executable, "-c", "from tether import _aliases\n"
                            "assert not _aliases.installed()\n_aliases.check()"],
                           capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 1, p.stderr)
        self.assertIn("RuntimeError: torch.distributed.rpc is not Tether's tether.rpc in this "
                      "process", p.stderr)


class CounterpartTest(unittest.TestCase):
    def test_counterparts(self):
        self.assertEqual(_aliases.counterpart("torch.distributed.rpc"), "tether.rpc")
        self.assertEqual(_aliases.counterpart("torch.distributed.rpc.api"), "tether.rpc.api")
        self.assertEqual(_aliases.counterpart("torch.distributed.autograd"), "tether.autograd")
        self.assertIsNone(_aliases.counterpart("torch.distributed.rpcx"))
        self.assertIsNone(_aliases.counterpart("torch.distributed.optim"))


class InstalledTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        _aliases.install()
        _aliases.install()  # idempotent

    def test_modules_are_tethers(self):
        _aliases.check()
        import torch.distributed.autograd as dist_autograd
        import torch.distributed.rpc as rpc
        import torch.distributed.rpc.api as api
        from torch.distributed.optim import DistributedOptimizer

        self.assertIs(rpc, tether.rpc)
        self.assertIs(torch.distributed.rpc, tether.rpc)
        self.assertIs(api, tether.rpc.api)
        self.assertIs(sys.modules["torch.distributed.rpc.functions"], tether.rpc.functions)
        self.assertIs(dist_autograd, tether.autograd)
        self.assertIs(DistributedOptimizer, tether.optim.DistributedOptimizer)
        import torch.distributed.optim.optimizer as torch_optimizer

        self.assertIs(torch_optimizer.DistributedOptimizer, tether.optim.DistributedOptimizer)

    def test_a_missing_submodule_fails_naming_it(self):
        with self.assertRaisesRegex(ModuleNotFoundError,
                                    r"No module named 'torch\.distributed\.rpc\._utils' "
                                    r"\(Tether has no tether\.rpc\._utils\)"):
            import torch.distributed.rpc._utils  # noqa: F401

    def test_remote_module_is_refused_naming_it(self):
        from torch.distributed.nn import RemoteModule
        from torch.distributed.nn.api import remote_module

        class Mine(RemoteModule):  # a program's subclass still defines
            pass

        for make in (lambda: RemoteModule("worker1/cpu", torch.nn.Linear, args=(2, 2)),
                     lambda: Mine("worker1/cpu", torch.nn.Linear)):
            with self.assertRaisesRegex(NotImplementedError, r"Tether does not implement "
                                        r"torch\.distributed\.nn\.RemoteModule: .*rpc\.remote"):
                make()
        with self.assertRaisesRegex(AttributeError, r"Tether does not implement "
                                    r"torch\.distributed\.nn\.api\.remote_module \(no _param_rrefs\)"):
            remote_module._param_rrefs

    def test_spawned_children_get_them_before_importing_main(self):
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        p = ctx.Process(target=_child_report, args=(queue,))
        p.start()
        try:
            report = queue.get(timeout=300)
        finally:
            p.join(300)
        self.assertEqual(p.exitcode, 0)
        self.assertEqual(report, ("tether.rpc", "tether.autograd"))

    def test_a_child_whose_main_was_imported_first_refuses(self):
        import multiprocessing.spawn as spawn

        spawn.old_main_modules.append(sys.modules["__main__"])
        try:
            with self.assertRaisesRegex(RuntimeError, "main module was imported before Tether"):
                _aliases._install_in_child()
        finally:
            spawn.old_main_modules.pop()


if __name__ == "__main__":
    unittest.main()
