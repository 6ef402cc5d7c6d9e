"""Multi-process helpers for the py_tests: workers are spawned processes on loopback that meet
through a file:// rendezvous in a fresh temporary directory."""
import os
import queue as queue_module
import time
import tempfile
import traceback

import torch.multiprocessing as mp

import tether.rpc as rpc

# Bound on any group's run; generous because the machine may be busy (not a timed assertion).
GROUP_TIMEOUT_S = 240


def new_init_method():
    return "file://" + os.path.join(tempfile.mkdtemp(prefix="tether_rdv_"), "store")


def options(init_method, **kwargs):
    return rpc.TensorPipeRpcBackendOptions(init_method=init_method, **kwargs)


def worker_name(rank):
    return f"worker{rank}"


def _serve(rank, world_size, init_method, num_worker_threads):
    rpc.init_rpc(worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=options(init_method, num_worker_threads=num_worker_threads))
    rpc.shutdown()  # Graceful: returns once every worker (the test process too) has shut down.


def start_servers(world_size, init_method, num_worker_threads=4):
    """Spawns ranks 1..world_size-1, which serve calls until everyone shuts down."""
    ctx = mp.get_context("spawn")
    procs = []
    for rank in range(1, world_size):
        p = ctx.Process(target=_serve, args=(rank, world_size, init_method, num_worker_threads))
        p.start()
        procs.append(p)
    return procs


def group(world_size, num_worker_threads=4):
    """A module fixture's body: this process is worker0 of a group of `world_size` whose other
    workers are spawned servers; yields while the group runs, then shuts it down gracefully."""
    init_method = new_init_method()
    procs = start_servers(world_size, init_method)
    rpc.init_rpc(worker_name(0), rank=0, world_size=world_size,
                 rpc_backend_options=options(init_method, num_worker_threads=num_worker_threads))
    yield
    rpc.shutdown()
    assert join_all(procs) == [0] * (world_size - 1)


def join_all(procs):
    for p in procs:
        p.join(GROUP_TIMEOUT_S)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    return codes


def _run_target(target, rank, world_size, init_method, queue):
    try:
        result = target(rank, world_size, init_method)
        queue.put((rank, "ok", result))
    except BaseException as e:  # reported to the test process
        queue.put((rank, "error", "".join(traceback.format_exception(e))))
        raise


def run_group(target, world_size, init_method=None):
    """Runs target(rank, world_size, init_method) in `world_size` spawned processes; returns the
    results by rank, or raises AssertionError with the failing ranks' tracebacks."""
    init_method = init_method or new_init_method()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_run_target, args=(target, r, world_size, init_method, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    # Until every rank has reported or exited (a rank may crash on purpose, reporting nothing).
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        try:
            rank, status, value = queue.get(timeout=0.2)
        except queue_module.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        (results if status == "ok" else errors)[rank] = value
    codes = join_all(procs)
    if errors:
        raise AssertionError("\n".join(f"rank {r} failed:\n{t}" for r, t in sorted(errors.items())))
    assert codes == [0] * world_size, f"exit codes {codes}"
    return results
