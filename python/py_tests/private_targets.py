"""Per-rank bodies of rpc_private_test (run in spawned processes by harness.run_group): the seed's
private bindings and PyTorch's Python-layer helpers, checked the way PyTorch's RPC tests use them."""
import datetime
import threading
import time

import pytest
import torch
import torch.distributed as dist

import tether.rpc as rpc
from tether.rpc import api, internal

import harness
import rpc_funcs as f

# PyTorch 1.13's TensorPipe agent's get_metrics() keys (printed from torch.distributed.rpc itself).
TORCH_METRIC_KEYS = {
    "agent.client_active_calls", "agent.server_active_calls", "agent.server_active_async_calls",
    "agent.num_idle_threads", "agent.thread_pool_size",
}


def _init(rank, world_size, init_method, **kwargs):
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=harness.options(init_method, **kwargs))


def current_agent_and_metrics(rank, world_size, init_method):
    assert not rpc._is_current_rpc_agent_set()
    with pytest.raises(RuntimeError, match="Current RPC agent is not set"):
        rpc.api._get_current_rpc_agent()
    _init(rank, world_size, init_method, num_worker_threads=3)
    assert rpc._is_current_rpc_agent_set() and rpc.api._is_current_rpc_agent_set()
    agent = rpc.api._get_current_rpc_agent()
    assert rpc._get_current_rpc_agent() is agent
    peer = harness.worker_name(1 - rank)
    assert agent.get_worker_info() == rpc.get_worker_info()
    assert agent.get_worker_info(peer) == agent.get_worker_info(1 - rank) == rpc.WorkerInfo(
        peer, 1 - rank)
    assert [(w.name, w.id) for w in agent.get_worker_infos()] == [("worker0", 0), ("worker1", 1)]
    assert agent.is_static_group

    metrics = agent.get_metrics()
    assert set(metrics) == TORCH_METRIC_KEYS, metrics
    assert metrics["agent.thread_pool_size"] == "3"
    assert 0 <= int(metrics["agent.num_idle_threads"]) <= 3
    assert set(agent.get_debug_info()) >= TORCH_METRIC_KEYS
    # Handlers running on the peer hold its pool threads (the sleeping one, and the one that
    # answers): its metrics say so. Once they are done, every thread is idle again.
    sleeping = rpc.rpc_async(peer, f.sleep, args=(3.0,))
    time.sleep(0.5)
    assert rpc.rpc_sync(peer, _idle_threads) <= 1
    sleeping.wait()
    rpc.api._barrier(["worker0", "worker1"])
    deadline = time.monotonic() + 30
    while int(agent.get_metrics()["agent.num_idle_threads"]) != 3:
        assert time.monotonic() < deadline, agent.get_metrics()
        time.sleep(0.01)
    rpc.enable_gil_profiling(True)
    rpc.rpc_sync(peer, f.add, args=(1, 1))
    rpc.rpc_sync(rpc.get_worker_info(), f.add, args=(1, 1))  # a Python call served here
    metrics = agent.get_metrics()
    assert set(metrics) == TORCH_METRIC_KEYS | {"agent.gil_average_wait_time_us"}, metrics
    rpc.enable_gil_profiling(False)

    assert agent.sync() is None
    agent.join()  # a barrier: every worker's calls are done after it
    assert int(agent.get_metrics()["agent.client_active_calls"]) == 0
    with pytest.raises(RuntimeError, match="_reset_current_rpc_agent: .*stays current"):
        rpc._reset_current_rpc_agent()
    # PyTorch's _finalize_shutdown, step by step.
    agent.join()
    rpc._destroy_rref_context(True)
    agent.shutdown()
    rpc._cleanup_python_rpc_handler()
    rpc._reset_current_rpc_agent()
    assert not rpc._is_current_rpc_agent_set()
    with pytest.raises(RuntimeError, match="Current RPC agent is not set"):
        rpc._get_current_rpc_agent()
    with pytest.raises(RuntimeError, match="get_metrics: the RPC agent is not running"):
        agent.get_metrics()
    return "ok"


def _idle_threads():
    return int(rpc.api._get_current_rpc_agent().get_metrics()["agent.num_idle_threads"])


def _barrier_helper(info, names, counts, multi_threaded=False):
    names = sorted(names)
    leader = names[0]
    rpc.rpc_sync(leader, _reset_count)
    rpc.api._barrier(names)
    rpc.rpc_sync(leader, _increment_count)
    rpc.api._barrier(names)
    if not multi_threaded and info.name == leader:
        counts.append(_barrier_count)


_barrier_count = 0
_count_lock = threading.Lock()


def _reset_count():
    global _barrier_count
    with _count_lock:
        _barrier_count = 0


def _increment_count():
    global _barrier_count
    with _count_lock:
        _barrier_count += 1


def all_gather_and_barriers(rank, world_size, init_method):
    _init(rank, world_size, init_method)
    info = rpc.get_worker_info()
    assert rpc.api._all_gather(info.id) == {f"worker{i}": i for i in range(world_size)}
    assert rpc.api._all_gather(info.name, timeout=0) == {
        f"worker{i}": f"worker{i}" for i in range(world_size)}
    everyone = [w.name for w in rpc._get_current_rpc_agent().get_worker_infos()]
    counts = []
    same_parity = [w for i, w in enumerate(everyone) if i % 2 == rank % 2]
    partial = same_parity if rank % 2 else [info.name]
    for names in (everyone, same_parity, partial):
        _barrier_helper(info, names, counts)
        # Nobody resets a leader's count for the next barrier before it has read it.
        rpc.api._barrier(everyone)
    threads = [threading.Thread(target=_barrier_helper, args=(info, everyone, [], True))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rpc.api._wait_all_workers()
    rpc.api._wait_all_workers()
    rpc.shutdown()
    return counts


class SlowPickle:
    def __init__(self, t):
        self.t = t

    def __getstate__(self):
        time.sleep(self.t)
        return (self.t,)

    def __setstate__(self, state):
        self.t = state[0]
        time.sleep(self.t)


def all_gather_timeout(rank, world_size, init_method):
    _init(rank, world_size, init_method)
    rpc._set_rpc_timeout(0.1)
    if rank == 0:
        with pytest.raises(RuntimeError, match=r"timed out in _all_gather after 0\.10 seconds"):
            rpc.api._all_gather(SlowPickle(0.5))
    else:
        with pytest.raises(rpc.RpcTimeoutError):
            rpc.api._all_gather(SlowPickle(0.5))
    rpc._set_rpc_timeout(60)
    time.sleep(2)  # the slow unpickling of what was sent finishes
    rpc.shutdown()
    return "ok"


class Marked:
    def __init__(self, value):
        self.value = value


def _marked_from(value):
    return ("reduced by the test pickler", value)


class CountingPickler(internal._InternalRPCPickler):
    """A program's pickler: counts what it pickles and reduces Marked its own way."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self._register_reducer(Marked, lambda m: (_marked_from, (m.value,)))

    def serialize(self, obj):
        self.calls += 1
        return super().serialize(obj)


def use_rpc_pickler(rank, world_size, init_method):
    _init(rank, world_size, init_method)
    if rank == 0:
        pickler = CountingPickler()
        x = torch.arange(4.0)
        assert rpc.rpc_sync("worker1", f.echo, args=(Marked(3),)).value == 3
        with rpc.api._use_rpc_pickler(pickler):
            assert rpc.api._default_pickler is pickler
            assert rpc.rpc_sync("worker1", f.echo, args=(Marked(3),)) == (
                "reduced by the test pickler", 3)
            assert torch.equal(rpc.rpc_async("worker1", f.add, args=(x, 1)).wait(), x + 1)
            rref = rpc.remote("worker1", f.add, args=(x, 2))
            assert torch.equal(rref.to_here(), x + 2)
            # RRefs in the arguments are forked for the call's destination.
            assert torch.equal(rpc.rpc_sync("worker1", f.rref_to_here, args=(rref,)), x + 2)
            # Builtin operators do not go through a pickler.
            assert torch.equal(rpc.rpc_sync("worker1", torch.add, args=(x, 1)), x + 1)
        assert pickler.calls == 4
        assert rpc.api._default_pickler is internal._internal_rpc_pickler
        assert rpc.rpc_sync("worker1", f.echo, args=(Marked(4),)).value == 4
        assert pickler.calls == 4
        # _internal_rpc_pickler's own interface, nested as PyTorch's tests nest it.
        data, tensors = internal._internal_rpc_pickler.serialize(
            internal.PythonUDF(f.add, (x, x + 1), None))
        assert len(tensors) == 2
        udf = internal._internal_rpc_pickler.deserialize(data, tensors)
        assert torch.equal(udf.func(*udf.args), 2 * x + 1)
        del rref
    rpc.shutdown()
    return "ok"


def invoke_paths(rank, world_size, init_method):
    _init(rank, world_size, init_method)
    if rank == 0:
        dst = rpc.get_worker_info("worker1")
        x = torch.ones(2)
        fut = rpc.api._invoke_rpc_builtin(dst, "aten::add", -1.0, x, 3)
        assert isinstance(fut, torch.futures.Future)
        assert torch.equal(fut.wait(), x + 3)
        fut = rpc._invoke_rpc_builtin(dst, "aten::add", -1.0, x, other=x, alpha=2)
        assert torch.equal(fut.wait(), 3 * x)
        data, tensors = rpc.api._default_pickler.serialize(internal.PythonUDF(f.add, (x, 4), {}))
        assert torch.equal(rpc.api._invoke_rpc_python_udf(dst, data, tensors, -1.0, False).wait(),
                           x + 4)
        qualified = torch._jit_internal._qualified_name(f.script_add)
        fut = rpc.api._invoke_rpc_torchscript("worker1", qualified, (x, 5), {}, -1.0, False)
        assert torch.equal(fut.wait(), x + 5)
        rref = rpc.api._invoke_remote_builtin(dst, "aten::mul", -1.0, x, 6)
        assert torch.equal(rref.to_here(), 6 * x) and rref.owner() == dst
        rref = rpc.api._invoke_remote_python_udf(dst, data, tensors, -1.0, False)
        assert torch.equal(rref.to_here(), x + 4)
        rref = rpc.api._invoke_remote_torchscript("worker1", qualified, -1.0, False, x, 7)
        assert torch.equal(rref.to_here(), x + 7)
        # Errors and timeouts as through rpc_async.
        data, tensors = rpc.api._default_pickler.serialize(
            internal.PythonUDF(f.raise_value_error, (), {}))
        with pytest.raises(ValueError):
            rpc.api._invoke_rpc_python_udf(dst, data, tensors, -1.0, False).wait()
        data, tensors = rpc.api._default_pickler.serialize(internal.PythonUDF(f.sleep, (2,), {}))
        with pytest.raises(rpc.RpcTimeoutError):
            rpc.api._invoke_rpc_python_udf(dst, data, tensors, 0.2, False).wait()
        with pytest.raises(NotImplementedError, match="_invoke_rpc_torchscript: .*async_execution"):
            rpc.api._invoke_rpc_torchscript("worker1", qualified, (x, 5), {}, -1.0, True)
        with pytest.raises(NotImplementedError, match="_invoke_remote_torchscript: "):
            rpc.api._invoke_remote_torchscript("worker1", qualified, -1.0, True, x, 7)
        with pytest.raises(TypeError, match="_invoke_rpc_builtin: the destination"):
            rpc.api._invoke_rpc_builtin(None, "aten::add", -1.0, x, 3)
        # TorchScript cannot hold Tether's RRefs: a clear error before anything is sent.
        with pytest.raises(NotImplementedError, match="_invoke_rpc_torchscript: RRefs cannot"):
            rpc.api._invoke_rpc_torchscript("worker1", qualified, (rref, 5), {}, -1.0, False)
        with pytest.raises(NotImplementedError, match="TorchScript function: RRefs cannot"):
            rpc.rpc_sync("worker1", f.script_add, args=([rref], 5))
        with pytest.raises(NotImplementedError, match="TorchScript function: RRefs cannot"):
            rpc.remote("worker1", f.script_add, kwargs={"x": rref, "y": 5})
        del rref
    rpc.shutdown()
    return "ok"


def rref_context_bindings(rank, world_size, init_method):
    _init(rank, world_size, init_method)

    def harness_barrier():
        rpc.api._barrier(["worker0", "worker1"])

    if rank == 0:
        rref = rpc.remote("worker1", f.add, args=(torch.ones(2), 1))
        assert torch.equal(rref.to_here(), torch.full((2,), 2.0))
        assert int(rpc.rpc_sync("worker1", f.rref_debug_info)["num_owner_rrefs"]) == 1
        rpc.api._delete_all_user_and_unforked_owner_rrefs(datetime.timedelta(seconds=30))
        # The user is gone: the owner has freed its value, and the RRef cannot be used.
        assert int(rpc.rpc_sync("worker1", f.rref_debug_info)["num_owner_rrefs"]) == 0
        with pytest.raises(RuntimeError):
            rref.to_here()
        rpc._delete_all_user_and_unforked_owner_rrefs(5.0)  # nothing left: returns at once
        # RRefs made afterwards live as usual (the delete-all mode ended with the call).
        again = rpc.remote("worker1", f.add, args=(torch.ones(2), 2))
        assert torch.equal(again.to_here(), torch.full((2,), 3.0))
        assert int(rpc.rpc_sync("worker1", f.rref_debug_info)["num_owner_rrefs"]) == 1
        del again
    harness_barrier()
    if rank == 1:
        leaked = rpc.RRef(torch.ones(1))  # an owner this worker keeps
        with pytest.raises(RuntimeError, match="Leaking RRef"):
            rpc._destroy_rref_context(False)
        rpc._destroy_rref_context(False)  # closed already: nothing more to say
        del leaked
    harness_barrier()
    rpc.shutdown()
    rpc._destroy_rref_context(False)  # after shutdown: the context went with it
    return "ok"


def init_rpc_backend_and_agent_lifecycle(rank, world_size, init_method):
    opts = harness.options(init_method)
    store, _, _ = next(dist.rendezvous(init_method, rank=rank, world_size=world_size))
    name = harness.worker_name(rank)
    with pytest.raises(RuntimeError, match="Argument not a store must be of type"):
        rpc._init_rpc_backend(rpc.BackendType.TENSORPIPE, "not a store", name, rank, world_size,
                              opts)
    with pytest.raises(TypeError, match="_set_and_start_rpc_agent: Tether runs only its own"):
        rpc._set_and_start_rpc_agent(object())
    rpc._set_profiler_node_id(rank + 10)
    with torch.autograd.profiler_legacy.profile() as prof:
        with torch.autograd.profiler.record_function("marked"):
            pass
    assert [e.node_id for e in prof.function_events if e.name == "marked"] == [rank + 10]
    rpc._init_rpc_backend(rpc.BackendType.TENSORPIPE, store, name, rank, world_size, opts)
    agent = rpc._get_current_rpc_agent()
    with pytest.raises(RuntimeError, match="RPC is already initialized"):
        rpc._init_rpc_backend(rpc.BackendType.TENSORPIPE, store, name, rank, world_size, opts)
    with pytest.raises(RuntimeError, match="_set_and_start_rpc_agent: Current RPC agent is"):
        rpc._set_and_start_rpc_agent(agent)
    peer = harness.worker_name(1 - rank)
    assert rpc.rpc_sync(peer, f.my_name) == peer
    with pytest.raises(NotImplementedError, match="_enable_jit_rref_pickle: Tether's RRefs"):
        rpc._enable_jit_rref_pickle()
    rpc._disable_jit_rref_pickle()
    agent.join(shutdown=True)  # a graceful shutdown
    assert not rpc._is_current_rpc_agent_set()
    assert not rpc.api._C.is_initialized()
    return "ok"
