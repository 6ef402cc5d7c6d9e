"""tether.sim on whole Python programs: a correct one explores clean and replays exactly; each
planted bug is reported with the right kind, where it waits, and a replay that reproduces it."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch  # noqa: F401

# The planted RRef bugs live only in the test-only extension variant (never in the shipped one).
# Under Bazel it is in the runfiles; elsewhere $TETHER_C_PLANTED_EXTENSION names it.
_PLANTED = os.environ.get("TETHER_C_PLANTED_EXTENSION") or os.path.join(
    os.environ.get("TEST_SRCDIR", ""), os.environ.get("TEST_WORKSPACE", ""), "python",
    "_C_planted.so")
if os.path.exists(_PLANTED):
    os.environ["TETHER_C_EXTENSION"] = _PLANTED

import tether.sim as sim  # noqa: E402
from tether import _C  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "examples")
sys.path.insert(0, EXAMPLES)

import correct  # noqa: E402
import fake_leak_text  # noqa: E402
import leaked_rref  # noqa: E402
import missing_timeout  # noqa: E402
import nested_deadlock  # noqa: E402
import returns_without_shutdown  # noqa: E402
import user_exception  # noqa: E402
import user_thread  # noqa: E402
import wait_named_shutdown  # noqa: E402

FAULTS = "delay=0..5ms,dup=0.05,reorder=0.2"


class CorrectProgramTest(unittest.TestCase):
    def test_explores_clean_with_faults(self):
        report = sim.explore(correct.main, 3, range(1, 13), FAULTS)
        self.assertEqual([str(f) for r in report.failed for f in r.failures], [])
        self.assertEqual(len(report.results), 12)

    def test_same_seed_same_trace(self):
        a = sim.run(correct.main, 3, seed=5, faults=FAULTS)
        b = sim.run(correct.main, 3, seed=5, faults=FAULTS)
        c = sim.run(correct.main, 3, seed=6, faults=FAULTS)
        self.assertTrue(a.ok and b.ok and c.ok, [a.failures, b.failures, c.failures])
        self.assertEqual(a.trace_hash, b.trace_hash)
        self.assertEqual(a.events, b.events)
        self.assertNotEqual(a.trace_hash, c.trace_hash)

    def test_trace_is_a_chrome_trace(self):
        r = sim.run(correct.main, 3, seed=2, record_trace=True)
        self.assertTrue(r.ok, r.failures)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "trace.json")
            sim.write_trace(r, path)
            with open(path) as fh:
                trace = json.load(fh)
        names = {e["name"] for e in trace["traceEvents"]}
        self.assertIn("send PYTHON_CALL", names)
        self.assertIn("recv RESPONSE", names)
        self.assertIn("process_name", names)
        self.assertEqual({e["pid"] for e in trace["traceEvents"]}, {0, 1, 2})

    def test_bad_fault_spec_is_refused(self):
        with self.assertRaisesRegex(ValueError, "bogus"):
            sim.run(correct.main, 2, faults="bogus=1")


class PlantedBugTest(unittest.TestCase):
    def test_nested_calls_deadlock_is_a_hang(self):
        r = sim.run(nested_deadlock.main, 2, seed=1, time_limit=30)
        self.assertIn("hang", r.kinds())
        waits = "\n".join(f.detail for f in r.failures)
        self.assertIn("free thread", waits)
        self.assertIn("nested_deadlock.py", waits)

    def test_missing_timeout_is_a_hang_and_replays(self):
        r = sim.run(missing_timeout.main, 2, seed=3, time_limit=30)
        self.assertIn("hang", r.kinds())
        self.assertIn("missing_timeout.py:16", "\n".join(f.detail for f in r.failures))
        again = sim.run(missing_timeout.main, 2, seed=3, time_limit=30)
        self.assertEqual(again.trace_hash, r.trace_hash)

    def test_leaked_rref_is_a_leak_naming_the_reference(self):
        self.assertTrue(_C.planted_bugs_enabled(), "the test-only planted extension is not loaded")
        r = sim.run(leaked_rref.main, 2, seed=1)
        self.assertEqual(r.kinds(), ["leak"])
        self.assertIn("RRef leak on worker 'worker1'", r.failures[0].detail)
        # Raised as its own type, which is still a RuntimeError (PyTorch-compatible handling).
        self.assertIn("tether._C.RRefLeakError: RPC shutdown was not graceful: RRef leak",
                      r.failures[0].detail)
        self.assertTrue(issubclass(_C.RRefLeakError, RuntimeError))

    def test_user_exception_has_its_traceback(self):
        r = sim.run(user_exception.main, 2, seed=1)
        self.assertIn("exception", r.kinds())
        worker1 = [f for f in r.failures if f.worker == "worker1"]
        self.assertEqual(len(worker1), 1)
        self.assertIn("ValueError: planted", worker1[0].detail)
        self.assertIn("user_exception.py", worker1[0].detail)

    def test_main_returning_without_shutdown_is_a_shutdown_failure(self):
        r = sim.run(returns_without_shutdown.main, 2, seed=1, time_limit=30)
        worker1 = [f for f in r.failures if f.worker == "worker1"]
        self.assertEqual([f.kind for f in worker1], ["shutdown"], r.failures)
        self.assertIn("without calling rpc.shutdown()", worker1[0].detail)

    def test_user_threads_are_refused(self):
        r = sim.run(user_thread.main, 2, seed=1)
        self.assertFalse(r.ok)
        self.assertIn("started a thread ('background')", "\n".join(f.detail for f in r.failures))


class FailureKindsAreDataTest(unittest.TestCase):
    """A failure's kind comes from what happened (the exception's type, the wait's kind), never
    from text a user's program can write too."""

    def test_user_error_reading_like_a_leak_and_a_missed_shutdown_is_an_exception(self):
        r = sim.run(fake_leak_text.main, 2, seed=1)
        self.assertEqual([(f.kind, f.worker) for f in r.failures], [("exception", "worker1")])
        self.assertIn("RuntimeError: RRef leak on worker 'worker1'", r.failures[0].detail)
        self.assertIn("without calling rpc.shutdown()", r.failures[0].detail)

    def test_a_wait_whose_line_says_shutdown_is_a_hang_and_the_barrier_a_shutdown(self):
        r = sim.run(wait_named_shutdown.main, 2, seed=1, time_limit=30)
        self.assertEqual({f.worker: f.kind for f in r.failures},
                         {"worker0": "shutdown", "worker1": "hang"}, r.failures)
        worker1 = [f for f in r.failures if f.worker == "worker1"][0]
        self.assertIn("shutdown_requested.wait()", worker1.detail)


class ExamplesUnderSimulationTest(unittest.TestCase):
    def test_parameter_server(self):
        import parameter_server

        report = sim.explore(parameter_server.main, 3, range(1, 4), "delay=0..2ms")
        self.assertEqual([str(f) for r in report.failed for f in r.failures], [])


class CommandTest(unittest.TestCase):
    def run_cli(self, *args):
        env = dict(os.environ, PYTHONHASHSEED="0")
        return subprocess.run([sys.executable, "-m", "tether.sim", *args], capture_output=True,
                              text=True, env=env, timeout=600)

    def test_clean_program_exits_zero(self):
        p = self.run_cli(os.path.join(HERE, "correct.py"), "--world-size", "3", "--seeds", "1..3",
                         "--faults", FAULTS, "--quiet")
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("explored seeds=3 failed=0", p.stdout)

    def test_failure_prints_a_replay_command_that_reproduces_it(self):
        script = os.path.join(HERE, "user_exception.py")
        p = self.run_cli(script, "--world-size", "2", "--seeds", "4..5", "--quiet")
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("explored seeds=2 failed=2", p.stdout)
        replay = [line.split("replay: ", 1)[1] for line in p.stdout.splitlines()
                  if "replay: " in line][0]
        self.assertIn("--seeds 4", replay)
        args = replay.split()[3:]  # after: /usr/bin/python3 -m tether.sim
        again = self.run_cli(*args, "--quiet")
        self.assertEqual(again.returncode, 1)
        self.assertIn("ValueError: planted", again.stdout)

    def test_bad_arguments(self):
        p = self.run_cli(os.path.join(HERE, "correct.py"), "--world-size", "2", "--seeds", "9..1")
        self.assertEqual(p.returncode, 2)
        self.assertIn("empty seed range", p.stderr)
        p = self.run_cli("/nonexistent.py", "--world-size", "2")
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("no such script", p.stderr)


if __name__ == "__main__":
    unittest.main()
