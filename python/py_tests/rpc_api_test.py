"""tether.rpc's calls, futures, errors and RRefs, checked the way PyTorch's RPC tests check them.
The test process is worker0 of a group of three; worker1 and worker2 are spawned processes."""
import asyncio
import contextlib
import gc
import io
import os
import pickle
import signal
import sys
import threading
import time
import weakref

import pytest
import torch

import tether.rpc as rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import rpc_funcs as f  # noqa: E402

WORLD = 3


@pytest.fixture(scope="module", autouse=True)
def group():
    yield from harness.group(WORLD)


# --- destinations, arguments -------------------------------------------------------------------

def test_to_as_name_rank_and_worker_info():
    info = rpc.get_worker_info("worker1")
    assert info.name == "worker1" and info.id == 1
    assert rpc.get_worker_info() == rpc.WorkerInfo("worker0", 0)
    assert rpc.get_worker_info(2).name == "worker2"
    for to in ("worker1", 1, info):
        assert rpc.rpc_sync(to, f.my_name) == "worker1"


def test_args_and_kwargs():
    assert rpc.rpc_sync("worker1", f.kw, args=(1,), kwargs={"b": 2, "c": 3}) == (1, 2, 3)
    assert rpc.rpc_sync("worker2", f.kw, kwargs={"a": 5}) == (5, 1, 0)
    assert rpc.rpc_async("worker1", f.add, args=("x", "y")).wait() == "xy"


def test_call_to_self():
    assert rpc.rpc_sync("worker0", f.add, args=(2, 3)) == 5
    t = torch.zeros(4)
    out = rpc.rpc_sync("worker0", f.mutate_in_place, args=(t,))
    assert torch.equal(out, torch.full((4,), 100.0))
    assert torch.equal(t, torch.zeros(4)), "a call to oneself must not share the caller's storage"


def test_worker_info_travels_and_compares():
    info = rpc.get_worker_info("worker2")
    assert rpc.rpc_sync("worker1", f.echo, args=(info,)) == info
    assert pickle.loads(pickle.dumps(info)) == info
    assert repr(info) == "WorkerInfo(id=2, name=worker2)"


def test_invalid_worker_names():
    with pytest.raises(RuntimeError, match="Worker name must match"):
        rpc.WorkerInfo("abc*", 0)
    with pytest.raises(RuntimeError, match="must be non-empty"):
        rpc.WorkerInfo("", 0)
    with pytest.raises(RuntimeError, match="shorter than 128"):
        rpc.WorkerInfo("a" * 500, 0)


# --- tensors ------------------------------------------------------------------------------------

def test_tensors_round_trip():
    big = torch.randn(1024, 1024)
    assert torch.equal(rpc.rpc_sync("worker1", f.echo, args=(big,)), big)
    view = torch.arange(100.0).reshape(10, 10).t()[2:5]  # non-contiguous
    assert torch.equal(rpc.rpc_sync("worker1", f.echo, args=(view,)), view)
    nested = {"a": [torch.ones(2), (torch.zeros(3, dtype=torch.int64), 7)], "b": torch.tensor(5)}
    back = rpc.rpc_sync("worker2", f.echo, args=(nested,))
    assert torch.equal(back["a"][0], nested["a"][0]) and back["a"][1][1] == 7
    assert back["a"][1][0].dtype == torch.int64 and back["b"].item() == 5
    assert rpc.rpc_sync("worker1", f.requires_grad, args=(torch.ones(2, requires_grad=True),))
    p = torch.nn.Parameter(torch.ones(3))
    assert torch.equal(rpc.rpc_sync("worker1", f.echo, args=(p,)), p.detach())


def test_tensors_travel_out_of_band():
    from tether.rpc import internal

    data, tensors = internal.serialize(internal.PythonUDF(f.echo, (torch.zeros(1 << 20),), {}), 1)
    assert len(tensors) == 1 and len(data) < 1000  # 4 MB tensor is not in the pickle


def test_tensors_of_other_layouts_are_refused_clearly():
    with pytest.raises(RuntimeError, match="layout SparseCsr: Tether sends dense"):
        rpc.rpc_sync("worker1", f.echo, args=(torch.eye(3).to_sparse_csr(),))


# --- builtin operators and TorchScript ------------------------------------------------------------

def test_builtin_operators():
    out = rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2, 2), 1))
    assert torch.equal(out, torch.full((2, 2), 2.0))
    out = rpc.rpc_sync("worker2", torch.add, args=(torch.ones(2), torch.ones(2)), kwargs={"alpha": 3})
    assert torch.equal(out, torch.full((2,), 4.0))
    values, indices = rpc.rpc_sync("worker1", torch.max, args=(torch.tensor([1.0, 5.0, 2.0]), 0))
    assert values.item() == 5.0 and indices.item() == 1
    fut = rpc.rpc_async(1, torch.mul, args=(torch.ones(3), 4))
    assert torch.equal(fut.wait(), torch.full((3,), 4.0))


def test_builtin_errors():
    with pytest.raises(RuntimeError, match="size of tensor"):
        rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), torch.ones(3)))
    with pytest.raises(RuntimeError, match="failed to many any schema: no overload of aten::add"):
        rpc.rpc_sync("worker1", torch.add, args=("a", 3))


def test_torchscript_function():
    out = rpc.rpc_sync("worker1", f.script_add, args=(torch.ones(2), 3))
    assert torch.equal(out, torch.full((2,), 4.0))
    assert torch.equal(rpc.rpc_async("worker2", f.script_add, args=(torch.ones(1), 1)).wait(),
                       torch.full((1,), 2.0))
    rref = rpc.remote("worker1", f.script_add, args=(torch.zeros(2), 5))
    assert torch.equal(rref.to_here(), torch.full((2,), 5.0))


# --- errors ---------------------------------------------------------------------------------------

def test_remote_exception_type_traceback_and_worker():
    with pytest.raises(ValueError, match="Expected error") as info:
        rpc.rpc_sync("worker1", f.raise_value_error)
    text = str(info.value)
    assert "On WorkerInfo(id=1, name=worker1)" in text
    assert "Traceback" in text and "raise_value_error" in text
    # As in PyTorch: ValueError and TypeError stay themselves, other types become RuntimeError
    # (the message starts with the type's name); to_here() raises the type itself.
    with pytest.raises(RuntimeError, match="(?s)^KeyError: .*missing-key"):
        rpc.rpc_async("worker2", f.raise_key_error).wait()
    with pytest.raises(KeyError, match="missing-key"):
        rpc.remote("worker2", f.raise_key_error).to_here()


def test_unknown_worker_and_bad_destination():
    with pytest.raises(RuntimeError, match="could not find destination name nobody"):
        rpc.rpc_sync("nobody", f.noop)
    with pytest.raises(RuntimeError, match="could not find destination id 17"):
        rpc.rpc_async(17, f.noop)
    with pytest.raises(ValueError, match="Cannot get WorkerInfo"):
        rpc.rpc_sync(1.5, f.noop)
    with pytest.raises(RuntimeError, match="could not find destination"):
        rpc.get_worker_info("WorkerUnknown")
    with pytest.raises(TypeError, match="callable"):
        rpc.rpc_sync("worker1", 3)


def test_unpicklable_argument_and_result():
    with pytest.raises((AttributeError, pickle.PicklingError, TypeError)):
        rpc.rpc_sync("worker1", f.echo, args=(lambda: 1,))
    with pytest.raises((AttributeError, pickle.PicklingError, TypeError)):
        rpc.rpc_sync("worker1", f.echo, args=(threading.Lock(),))
    # An unpicklable result is reported as the callee's error.
    with pytest.raises(Exception, match="On WorkerInfo\\(id=1, name=worker1\\)"):
        rpc.rpc_sync("worker1", f.return_unpicklable)
    # The worker keeps working.
    assert rpc.rpc_sync("worker1", f.add, args=(1, 1)) == 2


def test_timeouts():
    with pytest.raises(RuntimeError, match="RPC ran for more than") as info:
        rpc.rpc_sync("worker1", f.sleep, args=(1,), timeout=0.1)
    assert isinstance(info.value, TimeoutError)
    fut = rpc.rpc_async("worker2", f.sleep, args=(1,), timeout=0.1)
    with pytest.raises(TimeoutError, match="RPC ran for more than"):
        fut.wait()
    assert rpc.get_rpc_timeout() == 60
    rpc._set_rpc_timeout(0.05)
    try:
        assert rpc.get_rpc_timeout() == pytest.approx(0.05)
        with pytest.raises(RuntimeError, match="RPC ran for more than"):
            rpc.rpc_sync("worker1", f.sleep, args=(0.5,))
        # An explicit timeout overrides the default; 0 means none.
        assert rpc.rpc_sync("worker1", f.sleep, args=(0.2,), timeout=5) == 0.2
        assert rpc.rpc_sync("worker1", f.sleep, args=(0.2,), timeout=0) == 0.2
    finally:
        rpc._set_rpc_timeout(60)
    with pytest.raises(ValueError, match="timeout"):
        rpc.rpc_sync("worker1", f.noop, timeout=-5)


def _interrupt_soon(start):
    """SIGINT to this process 0.3 s from now; returns when it was sent (seconds after start)."""
    sent = []

    def interrupt():
        sent.append(time.monotonic() - start)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Timer(0.3, interrupt).start()
    return sent


def _expect_interrupted(wait, start, sent):
    try:
        wait()
    except KeyboardInterrupt:
        return
    # Which of the two went wrong: the wait ignored the signal, or the signal came too late.
    pytest.fail(f"not interrupted: the wait returned after {time.monotonic() - start:.1f}s; "
                + (f"SIGINT was sent at {sent[0]:.1f}s" if sent else "SIGINT not sent yet"))


@pytest.fixture
def sigint_raises_keyboard_interrupt():
    """Python's own SIGINT handler, whatever this process inherited: a process started in the
    background by a non-interactive shell ignores SIGINT, and then Python keeps ignoring it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_blocking_wait_is_interrupted_by_ctrl_c(sigint_raises_keyboard_interrupt):
    start = time.monotonic()
    sent = _interrupt_soon(start)
    _expect_interrupted(lambda: rpc.rpc_sync("worker1", f.sleep, args=(5,), timeout=0), start, sent)
    assert time.monotonic() - start < 4.5  # interrupted, not finished
    start = time.monotonic()
    sent = _interrupt_soon(start)
    fut = rpc.rpc_async("worker2", f.sleep, args=(5,), timeout=0)
    _expect_interrupted(fut.wait, start, sent)
    assert fut.wait() == 5  # the call itself carried on


# --- futures --------------------------------------------------------------------------------------

def test_futures_are_torch_futures():
    fut = rpc.rpc_async("worker1", f.add, args=(1, 2))
    assert isinstance(fut, torch.futures.Future)
    chained = fut.then(lambda x: x.wait() * 10)
    assert chained.wait() == 30
    futs = [rpc.rpc_async(f"worker{1 + i % 2}", f.add, args=(i, i)) for i in range(20)]
    assert torch.futures.wait_all(futs) == [2 * i for i in range(20)]
    done = []
    fut = rpc.rpc_async("worker2", f.add, args=(3, 4))
    fut.add_done_callback(lambda x: done.append(x.value()))
    assert fut.wait() == 7
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert done == [7]


def _wait_bounded(fut, seconds=60):
    """fut.wait() on a helper thread: a deadlock fails the test instead of hanging it."""
    box = []
    t = threading.Thread(target=lambda: box.append(fut.wait()), daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"wait() did not return within {seconds}s (deadlocked deliveries?)"
    return box[0]


def test_done_callback_may_wait_on_another_call():
    # The callback runs while the future is being delivered and blocks in wait() of a second
    # rpc_async, whose own delivery must not queue behind it.
    fut = rpc.rpc_async("worker1", f.add, args=(1, 2))
    chained = fut.then(lambda x: rpc.rpc_async("worker2", f.add, args=(x.wait(), 1)).wait())
    assert _wait_bounded(chained) == 4
    futs = [rpc.rpc_async("worker1", f.add, args=(i, 0)) for i in range(8)]
    chained = [fu.then(lambda x: rpc.rpc_async("worker2", f.add, args=(x.wait(), 0)).wait())
               for fu in futs]
    assert [_wait_bounded(c) for c in chained] == list(range(8))


def _freed(ref, seconds=10):
    deadline = time.monotonic() + seconds
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.02)
    return ref() is None


def test_rpc_async_futures_are_freed():
    fut = rpc.rpc_async("worker1", f.add, args=(1, 2))
    assert fut.wait() == 3  # delivered by wait() or by the delivery queue
    ref = weakref.ref(fut)
    del fut
    assert _freed(ref), "an rpc_async future outlived its last reference"
    fut = rpc.rpc_async("worker1", f.add, args=(1, 2))
    delivered = threading.Event()
    fut.add_done_callback(lambda _: delivered.set())  # nobody waits: the queue delivers
    assert delivered.wait(60)
    ref = weakref.ref(fut)
    del fut
    assert _freed(ref), "an rpc_async future outlived its last reference"


def test_future_completed_by_the_user_keeps_its_value():
    fut = rpc.rpc_async("worker1", f.sleep, args=(0.3,))
    fut.set_result("mine")
    assert fut.wait() == "mine"
    fut._pending.deliver_now()  # the wait()'s own delivery finds it complete too
    time.sleep(0.6)  # the reply arrives, finds the future complete, and is dropped
    assert fut.wait() == "mine"
    assert rpc.rpc_async("worker1", f.add, args=(1, 2)).wait() == 3  # deliveries go on


def test_future_errors_wait_twice_and_wait_all():
    futs = [rpc.rpc_async("worker1", f.raise_value_error) for _ in range(5)]
    with pytest.raises(ValueError, match="Expected error"):
        torch.futures.wait_all(futs)
    for fut in futs:
        with pytest.raises(ValueError, match="Expected error"):
            fut.wait()


def test_futures_await_in_asyncio():
    async def main():
        a = rpc.rpc_async("worker1", f.add, args=(1, 2))
        b = rpc.rpc_async("worker2", f.add, args=(3, 4))
        results = await asyncio.gather(a, b)
        with pytest.raises(ValueError, match="Expected error"):
            await rpc.rpc_async("worker1", f.raise_value_error)
        return results

    assert asyncio.run(main()) == [3, 7]


def test_wait_all_context_manager():
    with rpc._wait_all():
        futs = [rpc.rpc_async("worker1", f.add, args=(i, 1)) for i in range(5)]
    assert all(fut.done() for fut in futs)


# --- futures and errors as PyTorch's -------------------------------------------------------------

def test_wait_all_raises_at_the_first_error():
    slow = rpc.rpc_async("worker1", f.wait_for_gate, args=(30,))
    failing = rpc.rpc_async("worker2", f.raise_value_error)
    try:
        with pytest.raises(ValueError, match="Expected error"):
            torch.futures.wait_all([slow, failing])
        # It did not wait for the slow call: collect_all completes at the first error.
        assert not slow.done()
    finally:
        rpc.rpc_sync("worker1", f.open_gate)
    assert slow.wait() is True


def test_a_failed_call_is_an_error_of_its_future():
    fut = rpc.rpc_async("worker1", f.raise_value_error)
    with pytest.raises(ValueError, match="Expected error"):
        torch.futures.collect_all([fut]).wait()
    assert fut.done()
    with pytest.raises(ValueError, match="Expected error"):
        fut.value()
    assert fut.then(lambda done: "ignored").wait() == "ignored"
    with pytest.raises(RuntimeError, match="^Got the following error when running the callback: "
                                           "ValueError: ValueError: On WorkerInfo"):
        fut.then(lambda done: done.value()).wait()
    seen = []
    fut.add_done_callback(lambda done: seen.append(done.done()))
    assert seen == [True]
    # Tether's own errors keep their type.
    timed_out = rpc.rpc_async("worker1", f.sleep, args=(1,), timeout=0.05)
    with pytest.raises(rpc.RpcTimeoutError):
        torch.futures.collect_all([timed_out]).wait()
    with pytest.raises(rpc.RpcTimeoutError):
        timed_out.wait()


def test_profiled_call_carries_its_error():
    with torch.autograd.profiler_legacy.profile():
        fut = rpc.rpc_async("worker1", f.raise_value_error)
        with pytest.raises(ValueError, match="Expected error"):
            fut.wait()
        with pytest.raises(ValueError, match="Expected error"):
            torch.futures.collect_all([fut]).wait()


def test_rref_get_future_carries_the_creation_error():
    slow = rpc.rpc_async("worker1", f.wait_for_gate, args=(30,))
    rref = rpc.remote("worker2", f.sleep, args=(1,), timeout=0.05)
    fut = rref._get_future()
    try:
        with pytest.raises(rpc.RpcTimeoutError, match="RPC ran for more than set timeout"):
            torch.futures.wait_all([slow, fut])
        assert not slow.done()
    finally:
        rpc.rpc_sync("worker1", f.open_gate)
    assert slow.wait() is True
    with pytest.raises(RuntimeError, match="RPC ran for more than set timeout"):
        fut.wait()


def test_remote_exception_text_as_pytorch():
    with pytest.raises(ValueError) as info:
        rpc.rpc_async("worker1", f.raise_escaped).wait()
    text = str(info.value)
    # The exception's repr with its escapes undone (PyTorch's test_py_raise_in_user_func_
    # escaped_str), in the form PyTorch's future raises: "ValueError: <message>\n\nAt:...".
    assert text == text.encode("utf-8").decode("unicode_escape")
    assert text.startswith("ValueError: On WorkerInfo(id=1, name=worker1):\nValueError('"
                           + f.ESCAPED_TEXT + "')\nTraceback"), text
    assert "\n\nAt:\n" in text
    with pytest.raises(ValueError) as info:
        rpc.remote("worker1", f.raise_escaped).to_here()
    assert str(info.value).startswith(
        "On WorkerInfo(id=1, name=worker1):\nValueError('" + f.ESCAPED_TEXT + "')\nTraceback")


def test_remote_exception_is_logged_where_it_ran():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        with pytest.raises(ValueError, match="Expected error"):
            rpc.rpc_sync("worker0", f.raise_value_error)
    assert "On WorkerInfo(id=0, name=worker0)" in err.getvalue()
    assert "ValueError: Expected error" in err.getvalue()


# --- async_execution ------------------------------------------------------------------------------

def test_async_execution_chains_calls():
    out = rpc.rpc_sync("worker1", f.async_add_chained, args=("worker2", torch.ones(2), 1, 1))
    assert torch.equal(out, torch.full((2,), 3.0))


def test_async_execution_does_not_exhaust_threads():
    # Deeper than the thread pools (4 threads each): blocking nested calls would deadlock.
    assert rpc.rpc_sync("worker1", f.async_nested, args=(24, ["worker1", "worker2"])) == 24


def test_async_execution_must_return_a_future():
    text = ("Functions decorated with @rpc.async_function must return a torch.futures.Future "
            "object, but got builtins.int")
    # PyTorch's error, raised on the caller as RuntimeError with its text (not a remote
    # exception naming the callee), for every kind of call.
    for run in (lambda: rpc.rpc_sync("worker1", f.async_wrong_return),
                lambda: rpc.rpc_async("worker1", f.async_wrong_return).wait(),
                lambda: rpc.remote("worker1", f.async_wrong_return).to_here()):
        with pytest.raises(RuntimeError) as info:
            run()
        assert str(info.value) == text
    with pytest.raises(RuntimeError, match="but got builtins.list$"):
        rpc.rpc_sync("worker2", f.async_wrong_return_list)
    # The remote() itself succeeded (its value holds the error), as in PyTorch.
    assert rpc.remote("worker1", f.async_wrong_return)._get_future().wait() is None


def test_async_execution_failed_future_replies_its_error_text():
    # A returned future that fails: the caller raises RuntimeError with that error's text.
    with pytest.raises(RuntimeError) as info:
        rpc.rpc_sync("worker1", f.async_nested_raise, args=("worker2",))
    assert str(info.value).startswith(
        "ValueError: On WorkerInfo(id=2, name=worker2):\nValueError('Expected error')\n")
    rref = rpc.remote("worker1", f.async_nested_raise, args=("worker2",))
    with pytest.raises(RuntimeError, match="^ValueError: On WorkerInfo\\(id=2, name=worker2\\)"):
        rref.to_here()
    assert rref._get_future().wait() is None
    with pytest.raises(RuntimeError,
                       match="^Got the following error when running the callback: "
                             "ZeroDivisionError: division by zero"):
        rpc.rpc_async("worker1", f.async_then_raises, args=("worker2",)).wait()


# --- RRefs ----------------------------------------------------------------------------------------

def test_remote_and_to_here():
    rref = rpc.remote("worker1", f.add, args=(torch.ones(2), 1))
    assert torch.equal(rref.to_here(), torch.full((2,), 2.0))
    assert rref.owner() == rpc.get_worker_info("worker1")
    assert rref.owner_name() == "worker1"
    assert not rref.is_owner()
    assert rref.to_here(timeout=5).sum().item() == 4.0
    deadline = time.monotonic() + 30
    while not rref.confirmed_by_owner() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rref.confirmed_by_owner()
    builtin = rpc.remote(2, torch.add, args=(torch.ones(2), 3))
    assert torch.equal(builtin.to_here(), torch.full((2,), 4.0))
    with pytest.raises(RuntimeError, match=r"can.t call localValue\(\) on user"):
        rref.local_value()


def test_local_rref():
    rref = rpc.RRef([1, 2, 3])
    assert rref.is_owner() and rref.confirmed_by_owner()
    assert rref.owner() == rpc.get_worker_info()
    assert rref.local_value() == [1, 2, 3]
    assert rref.to_here() == [1, 2, 3]


def test_rref_plain_pickle_raises():
    with pytest.raises(RuntimeError, match="Can not pickle rref in python pickler"):
        pickle.dumps(rpc.RRef(35))
    with pytest.raises(RuntimeError, match="Can not pickle rref in python pickler"):
        torch.save(rpc.RRef(35), os.devnull)


def test_rrefs_in_arguments_and_results():
    local = rpc.RRef(torch.ones(3))
    # Owner -> user: worker1 fetches from us.
    assert torch.equal(rpc.rpc_sync("worker1", f.rref_to_here, args=(local,)), torch.ones(3))
    # User -> owner: the owner gets a local value.
    rref = rpc.remote("worker1", f.echo, args=(10,))
    assert rpc.rpc_sync("worker1", f.rref_local_plus, args=(rref, 5)) == 15
    # User -> another user (fork through a third worker).
    assert rpc.rpc_sync("worker2", f.rref_to_here, args=(rref,)) == 10
    assert rpc.rpc_sync("worker2", f.forward_rref, args=("worker1", local)).sum() == 3
    # RRef as a result.
    made = rpc.rpc_sync("worker2", f.create_local_rref, args=(7,))
    assert made.owner_name() == "worker2" and made.to_here() == 7


def test_remote_exception_through_rref():
    rref = rpc.remote("worker1", f.raise_value_error)
    with pytest.raises(ValueError, match="Expected error"):
        rref.to_here()


def test_rref_proxies():
    rref = rpc.remote("worker1", f.make_counter, args=(5,))  # an unpicklable value
    assert rref.rpc_sync().increment(2) == 7
    assert rref.rpc_async().increment().wait() == 8
    assert rref.remote().get().to_here() == 8
    assert rref.rpc_sync().async_get_plus(10) == 18
    with pytest.raises(RuntimeError, match="(?s)^AttributeError: .*has no attribute 'non_exist'"):
        rref.rpc_sync().non_exist()
    with pytest.raises(RuntimeError, match="counter failure"):
        rref.rpc_async().fail().wait()
    with pytest.raises(RuntimeError, match="serialize"):
        rref.to_here()  # the value itself cannot travel


def test_rref_context_debug_info_counts_owners():
    info = rpc._rref_context_get_debug_info()
    for key in ("num_owner_rrefs", "num_pending_users", "num_pending_futures", "num_forks"):
        assert key in info
    before = int(rpc.rpc_sync("worker2", f.rref_debug_info)["num_owner_rrefs"])
    held = [rpc.remote("worker2", torch.add, args=(torch.ones(1), 1)) for _ in range(2)]
    for r in held:
        r.to_here()
    after = int(rpc.rpc_sync("worker2", f.rref_debug_info)["num_owner_rrefs"])
    assert after == before + 2
    del held, r
    deadline = time.monotonic() + 60
    while int(rpc.rpc_sync("worker2", f.rref_debug_info)["num_owner_rrefs"]) != before:
        assert time.monotonic() < deadline, "owner RRefs were not freed after the users went"
        time.sleep(0.05)


# --- debug info -----------------------------------------------------------------------------------

def test_debug_info_and_gil_profiling():
    info = rpc._get_debug_info()
    for key in ("agent.client_active_calls", "agent.server_active_calls",
                "agent.server_active_async_calls", "agent.thread_pool_size", "num_owner_rrefs"):
        assert key in info, key
    assert info["agent.thread_pool_size"] == "4"
    agent_info = rpc.api._get_current_rpc_agent().get_debug_info()
    assert "agent.gil_average_wait_time_us" not in agent_info
    rpc.enable_gil_profiling(True)
    try:
        rpc.rpc_sync("worker0", f.add, args=(1, 1))  # a Python call served here takes the GIL
        agent_info = rpc.api._get_current_rpc_agent().get_debug_info()
        assert "agent.gil_average_wait_time_us" in agent_info
    finally:
        rpc.enable_gil_profiling(False)
    names = {w.name for w in rpc.api._get_current_rpc_agent().get_worker_infos()}
    assert names == {"worker0", "worker1", "worker2"}


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))
