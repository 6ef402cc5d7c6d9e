"""Inside one simulated worker process: run the user's function under the simulator.

The process was forked from the host (tether.sim.run) after the program was imported, so it has
its own copy of every module global, exactly as a real worker process would. Here, blocking
waits yield to the simulator, time is virtual, and random generators are seeded from the run's
seed. What the simulator cannot make deterministic (a user thread) raises a clear error.
"""
from __future__ import annotations

import multiprocessing.process
import os
import random
import sys
import threading
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed

from tether import _C


# Code of ours and torch's: a hang report names the user code line that called into it.
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (sys.modules["tether"], torch, threading)  # threading: the standard library
    if m is not None and getattr(m, "__file__", None)
)


class SimulationError(RuntimeError):
    """Something a simulated worker cannot do deterministically."""


def _where(what: str) -> str:
    """`what`, the tether.rpc call it happens in, and the user code line that made that call
    (for hang reports)."""

    def ours(filename: str) -> bool:
        return filename.startswith(_LIBRARY_DIRS) or filename.startswith("<")

    stack = traceback.extract_stack()[:-1]
    for i in range(len(stack) - 1, -1, -1):
        if ours(stack[i].filename):
            continue
        user = stack[i]
        source = f": {user.line.strip()}" if user.line else ""
        return f"{what} at {os.path.basename(user.filename)}:{user.lineno} in {user.name}{source}"
    return what


class _SimLock:
    """threading.Lock for a simulated worker: contention yields instead of blocking."""

    def __init__(self) -> None:
        self._lock = threading._allocate_lock()  # type: ignore[attr-defined]

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        ready = lambda: not self._lock.locked()  # noqa: E731
        while True:
            if not _C.sim_block_until(ready, _where("waiting for a lock"), timeout):
                return False
            if self._lock.acquire(False):
                return True

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _SimRLock:
    """threading.RLock for a simulated worker."""

    def __init__(self) -> None:
        self._lock = _SimLock()
        self._owner: int | None = None
        self._count = 0

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        if self._owner == me:
            self._count += 1
            return True
        if not self._lock.acquire(blocking, timeout):
            return False
        self._owner, self._count = me, 1
        return True

    def release(self) -> None:
        if self._owner != threading.get_ident():
            raise RuntimeError("cannot release un-acquired lock")
        self._count -= 1
        if self._count == 0:
            self._owner = None
            self._lock.release()

    def _is_owned(self) -> bool:
        return self._owner == threading.get_ident()

    __enter__ = acquire

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _event_wait(self: threading.Event, timeout: float | None = None) -> bool:
    if self.is_set():
        return True
    _C.sim_block_until(self.is_set, _where("threading.Event.wait"), -1 if timeout is None else timeout)
    return self.is_set()


def _refuse_thread(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
    raise SimulationError(
        f"tether.sim: worker code started a thread ({self.name!r}); a simulated worker cannot "
        "run its own threads deterministically. Use rpc_async / Future.then instead, or run "
        "this program for real."
    )


def _refuse_process(self: Any, *args: Any, **kwargs: Any) -> None:
    raise SimulationError(
        f"tether.sim: worker code started a process ({type(self).__name__} {self.name!r}, as "
        "torch.multiprocessing.spawn and multiprocessing do); under the simulator, tether.sim "
        "starts one simulated process per worker itself (--world-size). Give it a "
        "main(rank, world_size) or a script that reads RANK and WORLD_SIZE (as under torchrun), "
        "or run this program for real: python -m tether.run SCRIPT."
    )


def _refuse_process_group(*args: Any, **kwargs: Any) -> None:
    raise SimulationError(
        "tether.sim: worker code called torch.distributed.init_process_group; the simulator "
        "runs RPC (tether.rpc, torch.distributed.rpc under its aliases), not c10d collectives. "
        "Run this program for real: python -m tether.run SCRIPT."
    )


def _patch_process(seed: int, rank: int) -> None:
    # Virtual time.
    time.time = _C.sim_now
    time.monotonic = _C.sim_now
    time.perf_counter = _C.sim_now
    time.time_ns = lambda: int(_C.sim_now() * 1e9)
    time.monotonic_ns = time.time_ns
    time.perf_counter_ns = time.time_ns
    time.sleep = _C.sim_sleep
    # Waits that yield.
    # torch.futures.Future.wait calls torch._C.Future.wait, which is also what the futures
    # returned by then() and collect_all() use: one patch covers them all.
    original_wait = torch._C.Future.wait

    def future_wait(self: Any) -> Any:
        if not self.done():
            _C.sim_block_until(self.done, _where("Future.wait"))
        return original_wait(self)

    torch._C.Future.wait = future_wait

    def wait_all(futures: list) -> list:
        _C.sim_block_until(lambda: all(f.done() for f in futures), _where("wait_all"))
        return [f.wait() for f in futures]

    torch.futures.wait_all = wait_all
    threading.Event.wait = _event_wait  # type: ignore[method-assign]
    threading.Lock = _SimLock  # type: ignore[misc,assignment]
    threading.RLock = _SimRLock  # type: ignore[misc,assignment]
    threading.Thread.start = _refuse_thread  # type: ignore[method-assign]
    # Processes: the simulator's workers are its own (multiprocessing.Process, Pool workers and
    # torch.multiprocessing.spawn all start through BaseProcess.start).
    multiprocessing.process.BaseProcess.start = _refuse_process  # type: ignore[method-assign]
    torch.distributed.init_process_group = _refuse_process_group
    # Seeded randomness, different per worker, the same on every replay.
    worker_seed = (seed * 1_000_003 + rank) & 0xFFFFFFFF
    random.seed(worker_seed)
    torch.manual_seed(worker_seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(worker_seed)


def run_worker(fn: Callable[[int, int], Any], rank: int, world_size: int, fd: int, seed: int,
               num_threads: int) -> None:
    """Runs `fn(rank, world_size)` in this forked process under the simulator; never returns."""
    code = 0
    try:
        _C.sim_child_create(fd, rank, num_threads)
        _patch_process(seed, rank)
        _C.sim_child_wait_for_start()
        # The failure's kind goes to the host as data (tether.sim classifies by it, never by
        # the text): "shutdown" (main returned with RPC still up), "leak" (the graceful
        # shutdown found references alive: _C.RRefLeakError), "exception" (anything else).
        ok, kind, text = True, "", ""
        try:
            fn(rank, world_size)
            from tether import rpc

            if _C.is_initialized():
                ok, kind, text = False, "shutdown", (
                    "the worker's main function returned without calling rpc.shutdown(); "
                    "its peers lose it as if it had crashed"
                )
                rpc.shutdown(graceful=False)
        except BaseException as e:  # noqa: B902 (reported to the host)
            ok, text = False, traceback.format_exc()
            kind = "leak" if isinstance(e, _C.RRefLeakError) else "exception"
        sys.stdout.flush()
        sys.stderr.flush()
        _C.sim_child_main_done(ok, text, kind)
    except BaseException:  # noqa: B902
        traceback.print_exc()
        code = 3
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
