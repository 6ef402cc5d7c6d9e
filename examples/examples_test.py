"""Each example, at a small size, for real (one process per worker on loopback) and under
tether.sim (the same code, simulated)."""
import functools
import os
import sys
import unittest

import torch  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import tether.sim as sim  # noqa: E402
from launch import launch  # noqa: E402

import model_parallel  # noqa: E402
import parameter_server  # noqa: E402
import pipeline  # noqa: E402
import reinforcement_learning  # noqa: E402

SMALL = {
    "model_parallel": (model_parallel.main, 3, {"steps": 4, "verbose": False}),
    "parameter_server": (parameter_server.main, 3, {"steps": 5, "verbose": False}),
    "reinforcement_learning": (reinforcement_learning.main, 3, {"episodes": 4, "verbose": False}),
    "pipeline": (pipeline.main, 3, {"steps": 6, "micro_batches": 2, "verbose": False}),
}


class RealRunTest(unittest.TestCase):
    def check(self, name):
        fn, world, kwargs = SMALL[name]
        launch(fn, world, timeout=240, **kwargs)  # SystemExit naming the failed ranks

    def test_parameter_server(self):
        self.check("parameter_server")

    def test_reinforcement_learning(self):
        self.check("reinforcement_learning")

    def test_pipeline(self):
        self.check("pipeline")

    def test_model_parallel(self):
        self.check("model_parallel")


class SimulatedTest(unittest.TestCase):
    def check(self, name, seeds=range(1, 4), faults="delay=0..3ms,reorder=0.1"):
        fn, world, kwargs = SMALL[name]
        report = sim.explore(functools.partial(fn, **kwargs), world, seeds, faults)
        self.assertEqual([f"seed {r.seed}: {f}" for r in report.failed for f in r.failures], [])

    def test_parameter_server(self):
        self.check("parameter_server")

    def test_reinforcement_learning(self):
        self.check("reinforcement_learning")

    def test_pipeline(self):
        self.check("pipeline")

    def test_model_parallel(self):
        self.check("model_parallel")


if __name__ == "__main__":
    unittest.main()
