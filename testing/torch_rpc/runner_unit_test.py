"""The runner's own logic, without spawning anything: the error line a table shows, the
categories of the summary, and the placeholders for names Tether lacks."""
import unittest

from testing.torch_rpc.aliases import Missing, _counterpart
from testing.torch_rpc.run_one import first_error_line
from testing.torch_rpc.runner import Outcome, category

WORKER_FAILURE = """Traceback (most recent call last):
  File "common_distributed.py", line 769, in _check_return_codes
    raise RuntimeError(error)
RuntimeError: Process 0 exited with error code 10 and exception:
Traceback (most recent call last):
  File "rpc_test.py", line 12, in test_foo
    rpc.rpc_sync("worker1", f)
  File "api.py", line 3, in rpc_sync
    raise ValueError("first worker's error")
ValueError: first worker's error
with a second line

Process 1 exited with error code 10 and exception:
Traceback (most recent call last):
  File "rpc_test.py", line 12, in test_foo
KeyError: 'second worker'
"""


class FirstErrorLineTest(unittest.TestCase):
    def test_first_worker_exception(self):
        self.assertEqual(first_error_line(WORKER_FAILURE), "ValueError: first worker's error")

    def test_plain_traceback(self):
        text = 'Traceback (most recent call last):\n  File "x.py", line 1, in f\n    g()\n' \
               'AssertionError: 1 != 2\n'
        self.assertEqual(first_error_line(text), "AssertionError: 1 != 2")


class CategoryTest(unittest.TestCase):
    def outcomes(self, tether, torch):
        return {"tether": Outcome(tether, "", 0.0), "torch": Outcome(torch, "", 0.0)}

    def test_categories(self):
        both = ("tether", "torch")
        self.assertEqual(category(self.outcomes("pass", "pass"), both), "passed on both")
        self.assertEqual(category(self.outcomes("fail", "pass"), both), "failed only on Tether")
        self.assertEqual(category(self.outcomes("timeout", "pass"), both),
                         "failed only on Tether")
        self.assertEqual(category(self.outcomes("pass", "fail"), both), "failed only on PyTorch")
        self.assertEqual(category(self.outcomes("fail", "fail"), both), "failed on both")
        self.assertEqual(category(self.outcomes("pass", "skip"), both), "skipped")
        self.assertEqual(category(self.outcomes("n/a", "skip"), both), "n/a on Tether")
        self.assertEqual(category({"tether": Outcome("pass", "", 0)}, both), "not run")


class AliasTest(unittest.TestCase):
    def test_counterparts(self):
        self.assertEqual(_counterpart("torch.distributed.rpc"), "tether.rpc")
        self.assertEqual(_counterpart("torch.distributed.rpc.api"), "tether.rpc.api")
        self.assertEqual(_counterpart("torch.distributed.autograd"), "tether.autograd")
        self.assertIsNone(_counterpart("torch.distributed.rpcx"))
        self.assertIsNone(_counterpart("torch.distributed.optim"))

    def test_placeholder_raises_on_use_naming_the_name(self):
        mode = Missing("torch.distributed.rpc.internal.RPCExecMode")
        sync = mode.SYNC  # a default argument in a class body: no error yet
        self.assertIs(sync, mode.SYNC)
        for use in (lambda: mode(), lambda: sync == sync, lambda: bool(sync), lambda: str(sync),
                    lambda: list(mode), lambda: hash(sync)):
            with self.assertRaisesRegex(NotImplementedError,
                                        r"Tether lacks torch\.distributed\.rpc\.internal\."
                                        r"RPCExecMode"):
                use()


if __name__ == "__main__":
    unittest.main()
