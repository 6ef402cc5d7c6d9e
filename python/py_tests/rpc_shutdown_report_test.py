"""Shutdown never waits in silence: a handler deadlocked on one worker makes the others' graceful
shutdown() report, periodically and by name, what it waits for; the stuck worker's process exits
within the runtime's bound (after shutdown(graceful=False), or at exit); a worker killed with
SIGKILL while the others wait in shutdown() fails their shutdown at once, naming it.

Each test spawns its own group of worker processes (file:// rendezvous). Waits on other processes
are bounded only to turn a hang into a failure."""
import logging
import os
import signal
import sys
import threading
import time

import pytest
import torch.multiprocessing as mp

import tether.rpc as rpc
from tether.rpc import _shutdown

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# Seconds between reports in these tests, and the runtime's bound on joining its threads.
REPORT_INTERVAL = 0.5
JOIN_TIMEOUT_S = 2
# A hang bound, generous for a busy machine (not a speed assertion).
HANG_BOUND_S = 120
# Beyond the join bound, for a loaded machine's process teardown (torch's included): still far
# below the 120 s a stuck handler would hold an unbounded exit.
EXIT_MARGIN_S = 20

# Held by worker1's main thread for its whole run: _wait_on_lock deadlocks on it.
_LOCK = threading.Lock()


def _wait_on_lock():
    with _LOCK:
        return "never"


class _Reports(logging.Handler):
    """Collects tether.rpc's shutdown reports; once `count` of them name worker1, creates
    `marker` (which worker1 waits for)."""

    def __init__(self, marker, required=(), count=2):
        super().__init__()
        self.marker, self.required, self.count = marker, required, count
        self.texts = []

    def emit(self, record):
        text = record.getMessage()
        self.texts.append(text)
        named = sum("worker1" in t and "to call shutdown()" in t for t in self.texts)
        everything = "\n".join(self.texts)
        # Only once the reports show all the test checks (on a busy machine the first ones may
        # not have the stuck worker's own answer yet): then worker1 may leave.
        if named >= self.count and all(r in everything for r in self.required) and \
                not os.path.exists(self.marker):
            with open(self.marker, "w"):
                pass


# What each reporting worker's reports must show (checked by _check_others).
_REQUIRED = {
    0: ("PYTHON_CALL to worker1", "_wait_on_lock for worker0", "in _wait_on_lock: with _LOCK:"),
    2: ("as the leader worker0 sees it", "_wait_on_lock for worker0"),
}


def _rdv_dir(init_method):
    return os.path.dirname(init_method[len("file://"):])


def _init(rank, world_size, init_method):
    os.environ["TETHER_SHUTDOWN_JOIN_TIMEOUT"] = str(JOIN_TIMEOUT_S)
    _shutdown.REPORT_INTERVAL = REPORT_INTERVAL
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=harness.options(init_method, num_worker_threads=4))


def _wait_for_files(paths):
    deadline = time.monotonic() + HANG_BOUND_S
    while not all(os.path.exists(p) for p in paths):
        assert time.monotonic() < deadline, f"no reports: {paths}"
        time.sleep(0.05)


def _group_member(rank, world_size, init_method, how, queue):
    """Rank 1 deadlocks a handler, waits until ranks 0 and 2 have reported twice while waiting
    in shutdown(), then leaves `how`: "ungraceful" (shutdown(graceful=False)), "exit" (returns;
    the at-exit hook stops RPC) or "kill" (SIGKILL). The others shut down gracefully."""
    rdv = _rdv_dir(init_method)
    if rank == 1:
        # What this process writes on stderr (the runtime's report of threads it left behind).
        err = os.open(os.path.join(rdv, "stderr-1"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        _LOCK.acquire()
    _init(rank, world_size, init_method)
    try:
        if rank == 1:
            _wait_for_files([os.path.join(rdv, f"reported-{r}") for r in (0, 2)])
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if how == "ungraceful":
                start = time.monotonic()
                rpc.shutdown(graceful=False)
                queue.put((rank, "ok", time.monotonic() - start))
            else:
                queue.put((rank, "ok", time.time()))  # when it returned (compared with its exit)
            return  # "exit": RPC is stopped by the at-exit hook.
        reports = _Reports(os.path.join(rdv, f"reported-{rank}"), _REQUIRED[rank])
        logging.getLogger("tether.rpc").addHandler(reports)
        stuck = rpc.rpc_async("worker1", _wait_on_lock, timeout=0) if rank == 0 else None
        with pytest.raises(RuntimeError) as failed:
            rpc.shutdown()  # Fails once worker1 has gone without a graceful shutdown.
        if stuck is not None:
            with pytest.raises(RuntimeError):
                stuck.wait()
        queue.put((rank, "ok", (str(failed.value), reports.texts)))
    except BaseException as e:  # noqa: B902 (reported to the test)
        import traceback

        queue.put((rank, "error", "".join(traceback.format_exception(e))))
        raise


def _run(how, world_size=3):
    init_method = harness.new_init_method()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_group_member, args=(r, world_size, init_method, how, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + HANG_BOUND_S  # one bound for the whole group
    exited_at = {}  # rank -> time.time() when its exit was seen (polled)
    while len(exited_at) < world_size and time.monotonic() < deadline:
        for r, p in enumerate(procs):
            if r not in exited_at and not p.is_alive():
                exited_at[r] = time.time()
        time.sleep(0.05)
    for p in procs:
        p.join(0.1)
    alive = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    results, errors = {}, {}
    while not queue.empty():
        rank, status, value = queue.get()
        (results if status == "ok" else errors)[rank] = value
    assert not errors, "\n".join(f"rank {r}:\n{t}" for r, t in sorted(errors.items()))
    assert not alive, f"ranks {alive} hung"
    with open(os.path.join(_rdv_dir(init_method), "stderr-1")) as f:
        stderr1 = f.read()
    return results, [p.exitcode for p in procs], stderr1, exited_at


def _check_others(results):
    for rank in (0, 2):
        error, texts = results[rank]
        assert "worker1" in error, error
        named = [t for t in texts if "worker1" in t and "to call shutdown()" in t]
        assert len(named) >= 2, texts  # periodic
    # The leader (worker0) shows its own call stuck on worker1 and what worker1 says it runs.
    leader = "\n".join(results[0][1])
    assert "PYTHON_CALL to worker1" in leader, leader
    assert "_wait_on_lock for worker0" in leader, leader
    assert "in _wait_on_lock: with _LOCK:" in leader, leader
    # worker2 learnt from the leader who is missing and what that worker runs.
    follower = "\n".join(results[2][1])
    assert "as the leader worker0 sees it" in follower, follower
    assert "_wait_on_lock for worker0" in follower, follower


def _check_left_behind(stderr1):
    # The runtime's report (C++) and the Python stacks of what was left behind.
    assert "1 thread(s) still inside a task" in stderr1, stderr1
    assert "still running user code after shutdown were left behind" in stderr1, stderr1
    assert "_wait_on_lock" in stderr1, stderr1


def test_deadlocked_handler_reported_then_ungraceful_shutdown_exits():
    results, codes, stderr1, _ = _run("ungraceful")
    assert codes == [0, 0, 0]
    _check_others(results)
    for rank in (0, 2):
        assert "left without a graceful shutdown" in results[rank][0] or \
            "is gone" in results[rank][0], results[rank][0]
    # shutdown(graceful=False) returned after about the join bound, not when the handler did.
    assert results[1] < JOIN_TIMEOUT_S + EXIT_MARGIN_S, results[1]
    _check_left_behind(stderr1)


def test_deadlocked_handler_reported_then_process_exits_at_exit():
    results, codes, stderr1, exited_at = _run("exit")
    assert codes == [0, 0, 0]
    _check_others(results)
    # The process exited about the join bound after it returned, its handler still stuck.
    assert exited_at[1] - results[1] < JOIN_TIMEOUT_S + EXIT_MARGIN_S, exited_at[1] - results[1]
    _check_left_behind(stderr1)


def test_killed_worker_fails_shutdown_at_once_by_name():
    results, codes, _, _ = _run("kill")
    assert codes[1] == -signal.SIGKILL
    assert codes[0] == codes[2] == 0
    _check_others(results)
    for rank in (0, 2):
        assert "worker1 is gone" in results[rank][0], results[rank][0]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))
