"""Stress on the callee path that once crashed real runs (issue 20: a pybind11 deallocation race,
then a silent hang): nested calls through RRef proxies whose arguments are RRefs, from many pool
threads of every worker at once, on the real transport, with tether.sim imported as the examples'
test does. Each call's arguments carry RRefs, so the callee runs it from on_confirmed: inline when
the RRef is the callee's own, from a pool thread's callback when it is a fork of a third worker's
RRef that its owner must confirm first (touch()); handlers take a Python lock, build
autograd graphs, drop RRefs and collect garbage while other threads do the same.

Bounded: TETHER_STRESS_SECONDS (default 15) of calls per run, TETHER_STRESS_RUNS (default 2) runs.
Soak: TETHER_STRESS_SECONDS=120 TETHER_STRESS_RUNS=20 bazel test //python:rpc_stress_test
--test_timeout=3600 (or run this file with /usr/bin/python3 and PYTHONPATH=python)."""
import gc
import os
import sys
import tempfile
import threading
import time

import pytest
import torch

import tether.sim  # noqa: F401  (imported as examples_test.py imports it)
import tether.rpc as rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

WORLD = 3
THREADS = 8
PARALLEL = 3  # per leaf: below THREADS, so nested calls never starve a pool
SECONDS = float(os.environ.get("TETHER_STRESS_SECONDS", "15"))
RUNS = int(os.environ.get("TETHER_STRESS_RUNS", "2"))


class Hub:
    """Lives on worker0; every leaf calls it back, with an RRef argument, while holding nothing."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0
        self.model = torch.nn.Linear(4, 2)
        self.kept = []
        self.me = rpc.RRef(self)

    def step(self, leaf_rref, x):
        with self.lock:
            self.calls += 1
            y = self.model(x).sum()  # an autograd graph, dropped with the call
            self.kept.append(leaf_rref)  # RRefs received as arguments, kept a while then dropped
            if len(self.kept) > 16:
                self.kept.clear()
            if self.calls % 97 == 0:
                gc.collect()
            return int(y.detach().abs().item() * 0) + self.calls

    def note(self, leaf_rref, value):
        with self.lock:
            self.calls += 1
            return leaf_rref.owner().name, value


class Leaf:
    def __init__(self):
        self.me = rpc.RRef(self)
        self.count = 0

    def run(self, hub_rref, steps):
        total = 0
        for i in range(steps):
            total += hub_rref.rpc_sync().step(self.me, torch.ones(4) * i)
            name, _ = hub_rref.rpc_async().note(self.me, i).wait()
            assert name == rpc.get_worker_info().name
            self.count += 1
        return total

    def own_rref(self):
        return self.me

    def touch(self, other_leaf_rref):
        # An RRef owned by the other leaf, forked to this one by worker0: this call waited for its
        # owner's confirmation (on_confirmed's deferred path, from a pool thread's callback).
        return other_leaf_rref.rpc_sync().seen()

    def seen(self):
        return self.count


# What a swallowed error of the extension looks like (printed while dropping a reference, or
# reported as unraisable): any of these on a worker fails the run, as a crash would.
SWALLOWED = ("tether: error", "Exception ignored", "pybind11_object_dealloc", "Traceback")


def _watch_for_swallowed_errors():
    """Sends this worker's fd 2 (Python's and C++'s stderr alike) to a file; the returned check
    echoes it, restores fd 2 and fails on what a swallowed error prints."""
    unraisable = []
    sys.unraisablehook = lambda u: unraisable.append(f"{u.err_msg}: {u.exc_value!r}")
    out = tempfile.TemporaryFile()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(out.fileno(), 2)

    def check():
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        out.seek(0)
        text = out.read().decode(errors="replace")
        out.close()
        sys.stderr.write(text)
        found = [marker for marker in SWALLOWED if marker in text]
        assert not unraisable and not found, (unraisable, found, text[-4000:])

    return check


def _body(rank, world_size, init_method):
    check_swallowed = _watch_for_swallowed_errors()
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size,
                 rpc_backend_options=harness.options(init_method, num_worker_threads=THREADS))
    done = 0
    if rank == 0:
        hub = Hub()
        leaves = [rpc.remote(f"worker{r}", Leaf) for r in range(1, world_size)]
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            # RRefs of the leaves themselves travel too (fetched, forked back to their owner).
            leaf_refs = [leaf.rpc_sync().own_rref() for leaf in leaves]
            futs = [leaf.rpc_async().run(hub.me, 5) for leaf in leaves for _ in range(PARALLEL)]
            # Each leaf's RRef to the other leaf (a three-party fork: worker0 -> leaf -> owner).
            futs += [leaf.rpc_async().touch(leaf_refs[(i + 1) % len(leaves)])
                     for i, leaf in enumerate(leaves)]
            for fut in futs:
                fut.wait()
            del leaf_refs, futs
            done += 1
        assert hub.calls > 0
    rpc.shutdown()
    check_swallowed()
    return done


@pytest.mark.parametrize("run", range(RUNS))
def test_nested_rref_proxy_calls_with_rref_arguments(run):
    results = harness.run_group(_body, WORLD)
    assert results[0] > 0, results


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
