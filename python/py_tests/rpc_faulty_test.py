"""The backend registry and the FAULTY_TENSORPIPE backend (tether.rpc._testing): registration as
PyTorch's, options, and real runs whose sends fail or are delayed."""
import os
import sys
import time

import pytest
import torch

import tether.rpc as rpc
from tether import _C
from tether.rpc import backend_registry
from tether.rpc._testing import FaultyTensorPipeRpcBackendOptions

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def faulty_options(init_method, messages_to_fail=(), messages_to_delay=None, num_fail_sends=0,
                   rpc_timeout=30.0):
    return FaultyTensorPipeRpcBackendOptions(
        num_worker_threads=4, rpc_timeout=rpc_timeout, init_method=init_method,
        messages_to_fail=list(messages_to_fail), messages_to_delay=dict(messages_to_delay or {}),
        num_fail_sends=num_fail_sends)


def test_faulty_backend_is_registered_as_pytorchs():
    backend = backend_registry.BackendType["FAULTY_TENSORPIPE"]
    assert backend_registry.backend_registered("FAULTY_TENSORPIPE")
    assert repr(backend) == "BackendType.FAULTY_TENSORPIPE"
    # The newest backend comes first: options of a subclass infer the subclass's backend.
    assert [b.name for b in backend_registry.BackendType][:1] == ["FAULTY_TENSORPIPE"]
    assert backend_registry.BackendType.TENSORPIPE.name == "TENSORPIPE"
    opts = backend_registry.construct_rpc_backend_options(
        backend, init_method="file:///tmp/x", num_worker_threads=8, num_fail_sends=3,
        messages_to_fail=["RREF_FORK_REQUEST"], messages_to_delay={"SCRIPT_CALL": 1.5})
    assert isinstance(opts, FaultyTensorPipeRpcBackendOptions)
    assert (opts.num_worker_threads, opts.num_fail_sends, opts.messages_to_fail,
            opts.messages_to_delay, opts.rpc_timeout) == (
                8, 3, ["RREF_FORK_REQUEST"], {"SCRIPT_CALL": 1.5}, 60.0)
    with pytest.raises(RuntimeError, match="^RPC backend FAULTY_TENSORPIPE: already registered$"):
        backend_registry.register_backend("FAULTY_TENSORPIPE", None, None)


class StubOptions(rpc.RpcBackendOptions):
    pass


def test_a_registered_backend_that_returns_its_own_agent_is_refused():
    made = backend_registry.register_backend(
        "TEST_STUB_BACKEND", lambda rpc_timeout, init_method, **kw: StubOptions(
            rpc_timeout, init_method),
        lambda store, name, rank, world_size, rpc_backend_options: object())
    assert backend_registry.BackendType.TEST_STUB_BACKEND is made
    init_method = harness.new_init_method()
    # Inferred from its options' type, as PyTorch does.
    with pytest.raises(RuntimeError, match="TEST_STUB_BACKEND.*Tether runs only its own engine"):
        rpc.init_rpc("solo", rank=0, world_size=1,
                     rpc_backend_options=StubOptions(init_method=init_method))
    assert not rpc.api._C.is_initialized()


def test_a_registered_backend_that_starts_nothing_is_refused():
    made = backend_registry.register_backend(
        "TEST_IDLE_BACKEND", lambda rpc_timeout, init_method, **kw: IdleOptions(
            rpc_timeout, init_method),
        lambda store, name, rank, world_size, rpc_backend_options: None)
    init_method = harness.new_init_method()
    with pytest.raises(RuntimeError, match="TEST_IDLE_BACKEND: its init handler returned without"):
        rpc.init_rpc("solo", backend=made, rank=0, world_size=1,
                     rpc_backend_options=IdleOptions(init_method=init_method))
    assert not rpc.api._C.is_initialized()


class IdleOptions(rpc.RpcBackendOptions):
    pass


def _faulty_options_under_tensorpipe(rank, world_size, init_method):
    # PyTorch's TENSORPIPE backend takes the subclass's options and injects nothing.
    rpc.init_rpc(harness.worker_name(rank), backend=rpc.BackendType.TENSORPIPE, rank=rank,
                 world_size=world_size,
                 rpc_backend_options=faulty_options(init_method, ["PYTHON_CALL"], num_fail_sends=5,
                                                    messages_to_delay={"SCRIPT_CALL": 3.0}))
    if rank == 0:
        assert rpc.rpc_sync("worker1", slow_add, args=(1, 1, 0)) == 2
        assert rpc.rpc_sync("worker1", torch.add, args=(torch.ones(1), 1), timeout=1.5).item() == 2
    rpc.shutdown()
    return "ok"


def test_the_tensorpipe_backend_injects_no_faults():
    assert harness.run_group(_faulty_options_under_tensorpipe, 2) == {0: "ok", 1: "ok"}


def test_unknown_message_types_are_named():
    init_method = harness.new_init_method()
    for kwargs, what in (({"messages_to_fail": ["PYTHON_RET"], "num_fail_sends": 1},
                          "messages_to_fail: unknown or unsupported message type 'PYTHON_RET'"),
                         ({"messages_to_delay": {"BOGUS": 1.0}},
                          "messages_to_delay: unknown or unsupported message type 'BOGUS'")):
        with pytest.raises(ValueError, match=what):
            rpc.init_rpc("solo", rank=0, world_size=1,
                         rpc_backend_options=faulty_options(init_method, **kwargs))
        assert not rpc.api._C.is_initialized()
    with pytest.raises(ValueError, match="num_fail_sends must be >= 0"):
        rpc.init_rpc("solo", rank=0, world_size=1,
                     rpc_backend_options=faulty_options(init_method, ["RREF_USER_DELETE"],
                                                        num_fail_sends=-1))


def slow_add(a, b, seconds):
    time.sleep(seconds)
    return a + b


def _remote_dropped(rank, world_size, init_method):
    # Both workers fail their first PYTHON_REMOTE_CALL send; worker0's is the only one sent.
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=faulty_options(init_method, ["PYTHON_REMOTE_CALL"],
                                                    num_fail_sends=1))
    if rank == 0:
        assert rpc.api._C.is_initialized()
        rref = rpc.remote("worker1", slow_add, args=(torch.ones(2), 1, 0))
        with pytest.raises(RuntimeError, match="injected fault 1 of 1"):
            rref.to_here()
        # Forking it fails with the creation's error first, as in PyTorch.
        with pytest.raises(RuntimeError, match="^RRef creation via rpc.remote.. failed"):
            rref._serialize()
        with pytest.raises(RuntimeError, match="^RRef creation via rpc.remote.. failed"):
            rpc.rpc_async("worker1", slow_add, args=(rref, 1, 0))
        # The next one goes through; and builtin remotes (SCRIPT_REMOTE_CALL) were never failed.
        assert torch.equal(rpc.remote("worker1", slow_add, args=(torch.ones(2), 1, 0)).to_here(),
                           torch.full((2,), 2.0))
        assert torch.equal(rpc.remote("worker1", torch.add, args=(torch.ones(2), 1)).to_here(),
                           torch.full((2,), 2.0))
    rpc.shutdown()
    return "ok"


def test_a_failed_remote_creation_fails_its_rref():
    assert harness.run_group(_remote_dropped, 2) == {0: "ok", 1: "ok"}


def _delayed_calls(rank, world_size, init_method):
    # PyTorch's SCRIPT_CALL covers builtin operators: torch.add is delayed 1.5 s, Python calls not.
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=faulty_options(init_method,
                                                    messages_to_delay={"SCRIPT_CALL": 1.5}))
    if rank == 0:
        with pytest.raises(RuntimeError, match="RPC ran for more than"):
            rpc.rpc_sync("worker1", torch.add, args=(torch.ones(1), 1), timeout=0.5)
        start = time.monotonic()
        assert rpc.rpc_sync("worker1", torch.add, args=(torch.ones(1), 1)).item() == 2
        assert time.monotonic() - start >= 1.4
        assert rpc.rpc_sync("worker1", slow_add, args=(1, 1, 0), timeout=1.0) == 2
    rpc.shutdown()
    return "ok"


def test_delayed_message_types_time_out_and_others_do_not():
    assert harness.run_group(_delayed_calls, 2) == {0: "ok", 1: "ok"}


def _retried_rref_messages(rank, world_size, init_method):
    # Every retried RRef message fails its first 3 sends: the protocol's retries get them through,
    # and a graceful shutdown still ends with no RRef left anywhere.
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=faulty_options(
                     init_method, ["RREF_FORK_REQUEST", "RREF_CHILD_ACCEPT", "RREF_USER_DELETE"],
                     num_fail_sends=3))
    if rank == 0:
        owner = rpc.remote("worker1", torch.add, args=(torch.ones(2), 1))
        # Forks the RRef to worker2 (RREF_FORK_REQUEST / RREF_CHILD_ACCEPT) and back.
        got = rpc.rpc_sync("worker2", _fetch_and_add, args=(owner, 1))
        assert torch.equal(got, torch.full((2,), 3.0))
        del owner
    rpc.shutdown()
    return _C.failed_sends()  # what this worker's faulty network failed on purpose


def _fetch_and_add(rref, value):
    return rref.to_here() + value


def test_retried_rref_messages_survive_failed_sends():
    failed = harness.run_group(_retried_rref_messages, 3)
    # The faults were injected: a worker that sent one of the three types had its first 3 sends
    # of it failed (a retried message uses them up), no other type failed, every type was hit,
    # and the retries still got everything through.
    types = set()
    for per_worker in failed.values():
        assert set(per_worker.values()) <= {3}, failed
        types |= set(per_worker)
    assert types == {"RREF_FORK_REQUEST", "RREF_CHILD_ACCEPT", "RREF_USER_DELETE"}, failed


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
