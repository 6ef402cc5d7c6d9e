"""tether.rpc's life cycle: init_rpc (rendezvous kinds, options, errors), shutdown (graceful,
ungraceful), calls after shutdown, a crashed peer. Each test runs its own group of spawned
worker processes."""
import os
import sys

import pytest

import tether.rpc as rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import group_targets as g  # noqa: E402
import harness  # noqa: E402


def test_duplicate_name_is_refused():
    assert harness.run_group(g.duplicate_name, 2) == {0: "ok", 1: "ok"}


def test_reinit_and_calls_after_shutdown():
    harness.run_group(g.reinit_and_call_after_shutdown, 2)


def test_init_again_after_shutdown():
    harness.run_group(g.reinit_after_shutdown, 2)


def test_ungraceful_shutdown_fails_pending_calls():
    harness.run_group(g.ungraceful_shutdown_fails_pending_calls, 2)


def test_local_shutdown_right_after_init():
    harness.run_group(g.local_shutdown_right_away, 2)


def test_peer_crash_fails_only_its_calls():
    harness.run_group(g.peer_crash_fails_only_its_calls, 3)


def test_tcp_rendezvous_and_tether_options():
    port = g.free_port()
    out = harness.run_group(g.tcp_rendezvous_with_auth_token, 2, f"tcp://127.0.0.1:{port}")
    assert out == {0: [1.0, 1.0], 1: [2.0, 2.0]}


def test_env_rendezvous():
    out = harness.run_group(g.env_rendezvous, 2, g.free_port())
    assert out[0] == out[1] == ["worker0", "worker1"]


def test_rref_fork_chain_then_graceful_shutdown():
    harness.run_group(g.rref_fork_chain_and_graceful_shutdown, 3)


def test_options_validation():
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=8, rpc_timeout=5,
                                           init_method="tcp://127.0.0.1:1", _transports=["uv"])
    assert (opts.num_worker_threads, opts.rpc_timeout, opts.init_method) == (
        8, 5.0, "tcp://127.0.0.1:1")
    assert opts.device_maps == {} and opts.devices == []
    with pytest.raises(ValueError, match="CPU tensors only"):
        rpc.TensorPipeRpcBackendOptions(device_maps={"worker1": {0: 1}})
    with pytest.raises(ValueError, match="CPU tensors only"):
        rpc.TensorPipeRpcBackendOptions(devices=["cuda:0"])
    with pytest.raises(ValueError, match="CPU tensors only"):
        opts.set_device_map("worker1", {0: 1})
    with pytest.raises(ValueError, match="_transports"):
        rpc.TensorPipeRpcBackendOptions(_transports=["shm"])
    with pytest.raises(ValueError, match="num_worker_threads"):
        rpc.TensorPipeRpcBackendOptions(num_worker_threads=0)
    with pytest.raises(TypeError, match="BackendType"):
        rpc.init_rpc("w", backend="TENSORPIPE", rank=0, world_size=1)
    with pytest.raises(TypeError, match="RpcBackendOptions"):
        rpc.init_rpc("w", rank=0, world_size=1, rpc_backend_options={"rpc_timeout": 1})
    with pytest.raises(RuntimeError, match="Worker name must match"):
        rpc.init_rpc("bad name!", rank=0, world_size=1)
    assert repr(rpc.BackendType.TENSORPIPE) == "BackendType.TENSORPIPE"


def test_world_of_one():
    init_method = harness.new_init_method()
    rpc.init_rpc("solo", rank=0, world_size=1, rpc_backend_options=harness.options(init_method))
    try:
        assert rpc.rpc_sync("solo", sum, args=([1, 2, 3],)) == 6
        assert rpc.remote("solo", max, args=(4, 9)).to_here() == 9
    finally:
        rpc.shutdown()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))
