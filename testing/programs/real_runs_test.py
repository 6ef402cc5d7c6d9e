"""Real runs (processes on loopback): each worker's trace merges into one timeline that shows
every call on both sides; faults can be injected as with PyTorch's faulty agent."""
import json
import os
import subprocess
import sys
import tempfile
import unittest
from collections import Counter

import torch  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "examples"))

import real_runs  # noqa: E402
from launch import launch  # noqa: E402


class EnvVars:
    def __init__(self, **values):
        self.values = values

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RealRunTest(unittest.TestCase):
    def test_three_workers_traced_and_merged(self):
        with tempfile.TemporaryDirectory() as d, EnvVars(TETHER_TRACE_DIR=d):
            launch(real_runs.traced, 3, timeout=120)
            files = sorted(f for f in os.listdir(d) if f.startswith("trace-"))
            self.assertEqual(files, ["trace-worker0.json", "trace-worker1.json",
                                     "trace-worker2.json"])
            merged = os.path.join(d, "merged.json")
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "merge-traces"), merged,
                            *[os.path.join(d, f) for f in files]], check=True)
            with open(merged) as fh:
                events = json.load(fh)["traceEvents"]
        seen = Counter((e["pid"], e["name"]) for e in events if e.get("cat") == "message")
        for w in range(3):
            # Each worker calls the two others, and serves the two others' calls.
            self.assertGreaterEqual(seen[(w, "send PYTHON_CALL")], 2, seen)
            self.assertGreaterEqual(seen[(w, "recv PYTHON_CALL")], 2, seen)
            self.assertGreaterEqual(seen[(w, "recv RESPONSE")], 2, seen)
        names = {e["args"]["name"] for e in events if e["name"] == "process_name"}
        self.assertEqual(names, {"worker0", "worker1", "worker2"})
        spans = [e for e in events if e.get("cat") == "call" and e["ph"] in "be"]
        self.assertGreaterEqual(len(spans), 12)
        # Each worker's timed-out and raising calls are error markers on its own track; the
        # exception also on the track of the worker that raised it.
        errors = Counter((e["pid"], e["name"]) for e in events if e.get("cat") == "error")
        for w in range(3):
            self.assertEqual(errors[(w, "call raised")], 1, errors)
            self.assertEqual(errors[(w, "replied with exception")], 1, errors)
            self.assertTrue(any(
                e.get("cat") == "error" and e["pid"] == w and e["name"] == "call failed"
                and "DEADLINE_EXCEEDED" in e["args"]["detail"] for e in events), w)
        # Worker w made a remote() owned by worker (w + 1) % 3 and fetched it: the user's
        # events on w's track, the owner's on the next one's, naming the same reference.
        rref = [e for e in events if e.get("cat") == "rref"]
        by_track = Counter((e["pid"], e["name"]) for e in rref)
        for w in range(3):
            for name in ("rref user created", "rref user confirmed", "rref owner created",
                         "rref fork added", "rref value set", "rref value served"):
                self.assertGreaterEqual(by_track[(w, name)], 1, (w, name, by_track))
            user = next(e["args"]["detail"] for e in rref
                        if e["pid"] == w and e["name"] == "rref user confirmed")
            rref_id, fork_id = user.split()[1], user.split()[3]  # "rref ID fork ID peer N"
            owner = (w + 1) % 3
            self.assertTrue(user.endswith(f"peer {owner}"), user)
            self.assertIn(f"rref {rref_id} fork {fork_id} peer {w}",
                          [e["args"]["detail"] for e in rref
                           if e["pid"] == owner and e["name"] == "rref fork added"])

    def test_faulty_sends_like_pytorchs_faulty_agent(self):
        with tempfile.TemporaryDirectory() as d, EnvVars(TETHER_TRACE_DIR=d):
            launch(real_runs.first_send_fails, 2, timeout=120)
            with open(os.path.join(d, "trace-worker0.json")) as fh:
                events = json.load(fh)["traceEvents"]
        # The failed send is an error on worker0's track.
        failed = [e for e in events if e.get("cat") == "error" and e["name"] == "send failed"]
        self.assertEqual(len(failed), 1, events)
        self.assertIn("failed intentionally for PYTHON_CALL", failed[0]["args"]["error"])

    def test_rpcs_appear_in_the_autograd_profiler_with_pytorchs_names(self):
        launch(real_runs.profiled, 2, timeout=120)

    def test_bad_fault_options_are_refused(self):
        with EnvVars(TETHER_FAULTY_MESSAGES="NOT_A_TYPE", TETHER_NUM_FAIL_SENDS="1"):
            with self.assertRaises(SystemExit):
                launch(real_runs.traced, 2, timeout=60)


if __name__ == "__main__":
    unittest.main()
