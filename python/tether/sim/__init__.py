"""tether.sim: run an unmodified tether.rpc program under the deterministic simulator.

    import tether.sim

    def main(rank, world_size):          # the same function a real worker process runs
        rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
        ...
        rpc.shutdown()

    result = tether.sim.run(main, world_size=3, seed=7, faults="drop=0.01,delay=0..5ms")
    report = tether.sim.explore(main, world_size=3, seeds=range(1, 1001), faults="all")

Each simulated worker is its own process, forked from this one, so it sees its own module
globals; the simulator (in this process) owns virtual time, the network and its faults, and lets
exactly one worker run at a time. The same seed replays the same run, event for event.

Fault specs are the simulator's, written the same way everywhere (this API, `python -m
tether.sim`, and the C++ explorer): `none`, `all`, or comma-separated tokens such as
`drop=0.05`, `delay=0..50ms`, `dup=0.02`, `reorder=0.1`, `partition=0-1@100ms..2s`,
`crash=2@300ms`, `type=RREF_USER_DELETE:drop=0.5`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from typing import Any, Callable, Iterable, List, Optional, Sequence

import torch  # noqa: F401  (the extension needs torch loaded first)

from tether import _C

__all__ = ["run", "explore", "shrink", "SimResult", "Failure", "ExploreReport", "write_trace"]

DEFAULT_TIME_LIMIT = 600.0  # virtual seconds


@dataclasses.dataclass
class Failure:
    """What went wrong in one simulated run."""

    kind: str  # "exception", "hang", "shutdown", "leak", "crash"
    worker: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.worker}: {self.detail}"


@dataclasses.dataclass
class SimResult:
    seed: int
    faults: str
    plan: str  # the faults this seed drew (a concrete spec)
    ok: bool
    failures: List[Failure]
    trace_hash: int
    virtual_seconds: float
    events: int
    wall_seconds: float
    trace: List[tuple] = dataclasses.field(default_factory=list, repr=False)

    def kinds(self) -> List[str]:
        return sorted({f.kind for f in self.failures})


# The kinds a worker reports for its main function (tether.sim._child.run_worker), as data.
_MAIN_KINDS = ("exception", "leak", "shutdown")


def _classify(raw: dict) -> List[Failure]:
    """Failures by kind, decided by the data the workers and the host report (a worker's
    error_kind, whether a hung worker waits in the shutdown barrier), never by their text: a
    user's exception that happens to read like a leak is an exception."""
    failures: List[Failure] = []
    for rank, w in enumerate(raw["workers"]):
        name = w["name"] or f"rank {rank}"
        if w["crashed"]:
            continue  # Planned by the fault spec; what it breaks elsewhere is reported there.
        if w["lost"]:
            failures.append(Failure("crash", name, w["error"]))
        elif w["main_done"] and not w["ok"]:
            kind = w["error_kind"] if w["error_kind"] in _MAIN_KINDS else "exception"
            failures.append(Failure(kind, name, w["error"].rstrip()))
        elif not w["main_done"]:
            waits = w["blocked"] or ["(nothing recorded)"]
            failures.append(Failure(
                "shutdown" if w["blocked_in_shutdown"] else "hang", name,
                f"{raw['hang'] or 'did not finish'}; still waiting on:\n    " + "\n    ".join(waits),
            ))
    return failures


def run(fn: Callable[[int, int], Any], world_size: int, seed: int = 0, faults: str = "none", *,
        time_limit: float = DEFAULT_TIME_LIMIT, max_events: int = 20_000_000,
        num_worker_threads: int = 16, record_trace: bool = False,
        worker_output: bool = True) -> SimResult:
    """Runs `fn(rank, world_size)` for each simulated worker, once, from `seed`.

    `time_limit` bounds virtual time (a run past it is a hang); `num_worker_threads` is each
    worker's thread pool (RPC handlers that block hold a thread, as for real);
    `worker_output=False` discards what the workers print.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    canonical = _C.sim_parse_faults(faults)  # ValueError naming a bad token
    if sys.flags.hash_randomization and os.environ.get("PYTHONHASHSEED") in (None, "random"):
        import warnings

        warnings.warn("tether.sim: set PYTHONHASHSEED=0 so that replays are exact "
                      "(python -m tether.sim does this for you)", RuntimeWarning, stacklevel=2)
    from ._child import run_worker

    sys.stdout.flush()
    sys.stderr.flush()
    host_fds: List[int] = []
    pids: List[int] = []
    started = time.perf_counter()
    try:
        for rank in range(world_size):
            parent_end, child_end = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # The simulated worker.
                parent_end.close()
                if not worker_output:
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, 1)
                    os.dup2(devnull, 2)
                for fd in host_fds:
                    os.close(fd)
                run_worker(fn, rank, world_size, child_end.detach(), seed, num_worker_threads)
            child_end.close()
            host_fds.append(parent_end.detach())
            pids.append(pid)
        fds, host_fds = host_fds, []
        raw = _C.sim_host_run(fds, seed, faults, time_limit, max_events, record_trace=record_trace)
    finally:
        for fd in host_fds:
            os.close(fd)
        for pid in pids:
            os.waitpid(pid, 0)
    failures = _classify(raw)
    return SimResult(
        seed=seed, faults=canonical, plan=raw["plan"] or "none", ok=not failures,
        failures=failures, trace_hash=raw["trace_hash"], virtual_seconds=raw["elapsed"],
        events=raw["events"], wall_seconds=time.perf_counter() - started, trace=raw["trace"],
    )


@dataclasses.dataclass
class ExploreReport:
    results: List[SimResult]
    wall_seconds: float

    @property
    def failed(self) -> List[SimResult]:
        return [r for r in self.results if not r.ok]

    def by_kind(self) -> dict:
        counts: dict = {}
        for r in self.failed:
            for k in r.kinds():
                counts[k] = counts.get(k, 0) + 1
        return counts


def explore(fn: Callable[[int, int], Any], world_size: int, seeds: Iterable[int],
            faults: str = "none", *, progress: Optional[Callable[[int, int, SimResult], None]] = None,
            **run_kwargs: Any) -> ExploreReport:
    """Runs `fn` once per seed and collects the results. `progress(done, total, result)` is
    called after each seed."""
    seeds = list(seeds)
    started = time.perf_counter()
    results = []
    for i, seed in enumerate(seeds):
        r = run(fn, world_size, seed, faults, **run_kwargs)
        results.append(r)
        if progress:
            progress(i + 1, len(seeds), r)
    return ExploreReport(results, time.perf_counter() - started)


def shrink(fn: Callable[[int, int], Any], world_size: int, failing: SimResult,
           **run_kwargs: Any) -> SimResult:
    """A smaller fault schedule that still fails the same way: starting from the concrete plan
    the failing seed drew, drops one fault at a time (and halves delays) while the run still
    fails with the same kinds. Returns the smallest failing run found."""
    want = set(failing.kinds())
    best = failing
    tokens = [t for t in failing.plan.split(",") if t and t != "none"]

    def attempt(candidate: List[str]) -> Optional[SimResult]:
        spec = ",".join(candidate) or "none"
        r = run(fn, world_size, failing.seed, spec, **run_kwargs)
        return r if not r.ok and want <= set(r.kinds()) else None

    changed = True
    while changed and tokens:
        changed = False
        for i in range(len(tokens)):
            r = attempt(tokens[:i] + tokens[i + 1:])
            if r is not None:
                tokens, best, changed = tokens[:i] + tokens[i + 1:], r, True
                break
    return best


def write_trace(result: SimResult, path: str) -> None:
    """Writes a run recorded with record_trace=True as a Chrome trace (Perfetto,
    chrome://tracing): one track per worker, its calls, messages, faults and failures."""
    events = [json.loads(text) for _, text in result.trace]
    for f in result.failures:
        events.append({"name": f"FAILED: {f.kind}", "ph": "i", "s": "g", "pid": 0, "tid": 0,
                       "ts": int(result.virtual_seconds * 1e6), "cat": "failure",
                       "args": {"worker": f.worker, "detail": f.detail}})
    with open(path, "w") as fh:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms",
                   "otherData": {"seed": result.seed, "faults": result.faults,
                                 "plan": result.plan, "trace_hash": f"{result.trace_hash:016x}"}},
                  fh)
