"""The seed's private bindings (torch.distributed.rpc's _get_current_rpc_agent, _invoke_*,
_set_and_start_rpc_agent, ...) and the Python-layer helpers of PyTorch's api module (_all_gather,
_barrier, _wait_all_workers, _use_rpc_pickler) on tether.rpc. Each test runs its own group of
spawned worker processes (private_targets.py has the per-rank bodies)."""
import os
import sys

import pytest

import tether.rpc as rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import private_targets as t  # noqa: E402


def test_current_agent_metrics_join_and_finalize_steps():
    assert harness.run_group(t.current_agent_and_metrics, 2) == {0: "ok", 1: "ok"}


def test_all_gather_barriers_and_wait_all_workers():
    out = harness.run_group(t.all_gather_and_barriers, 4)
    # The leader of each barrier saw every member's increment between its two barriers.
    assert out[0] == [4, 2, 1]
    assert out[1] == [2, 2]
    assert out[2] == [1]
    assert out[3] == []


def test_all_gather_timeout():
    assert harness.run_group(t.all_gather_timeout, 2) == {0: "ok", 1: "ok"}


def test_use_rpc_pickler_switches_the_pickler_of_python_calls():
    assert harness.run_group(t.use_rpc_pickler, 2) == {0: "ok", 1: "ok"}


def test_invoke_paths_take_pytorch_arguments():
    assert harness.run_group(t.invoke_paths, 2) == {0: "ok", 1: "ok"}


def test_delete_all_user_rrefs_and_destroy_rref_context():
    assert harness.run_group(t.rref_context_bindings, 2) == {0: "ok", 1: "ok"}


def test_init_rpc_backend_set_and_start_and_clear_errors():
    assert harness.run_group(t.init_rpc_backend_and_agent_lifecycle, 2) == {0: "ok", 1: "ok"}


def test_init_errors_in_pytorch_words(monkeypatch, tmp_path):
    from datetime import timedelta

    with pytest.raises(TypeError, match="incompatible constructor arguments: rpc_timeout"):
        rpc.TensorPipeRpcBackendOptions(rpc_timeout=timedelta(seconds=1))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    file_init = f"file://{tmp_path}/store"
    for init, why in ((file_init, "file:// rendezvous: rank parameter missing"),
                      ("tcp://127.0.0.1:29999", "tcp:// rendezvous: rank parameter missing"),
                      ("env://", "env:// rendezvous: environment variable RANK expected")):
        options = rpc.TensorPipeRpcBackendOptions(init_method=init)
        with pytest.raises(ValueError, match=why):
            rpc.init_rpc("w", rpc_backend_options=options)
    with pytest.raises(ValueError, match="dynamic RPC groups are not supported"):
        rpc.init_rpc("w", rank=0, rpc_backend_options=rpc.TensorPipeRpcBackendOptions(
            init_method=file_init))
    assert not os.path.exists(f"{tmp_path}/store")  # no rendezvous was attempted


def test_names_where_pytorch_has_them():
    import tether.rpc.api as api
    import tether.rpc.internal as internal

    for name in ("_is_current_rpc_agent_set", "_get_current_rpc_agent", "_set_and_start_rpc_agent",
                 "_reset_current_rpc_agent", "_delete_all_user_and_unforked_owner_rrefs",
                 "_destroy_rref_context", "_cleanup_python_rpc_handler", "_invoke_rpc_builtin",
                 "_invoke_rpc_python_udf", "_invoke_rpc_torchscript", "_invoke_remote_builtin",
                 "_invoke_remote_python_udf", "_invoke_remote_torchscript", "_set_rpc_timeout",
                 "_set_profiler_node_id", "_enable_jit_rref_pickle", "_disable_jit_rref_pickle",
                 "_init_rpc_backend"):
        assert callable(getattr(rpc, name)), name
    for name in ("_all_gather", "_barrier", "_wait_all_workers", "_use_rpc_pickler",
                 "_default_pickler", "_gather_to_leader", "_broadcast_to_followers",
                 "_get_current_rpc_agent", "_is_current_rpc_agent_set",
                 "_delete_all_user_and_unforked_owner_rrefs", "_thread_local_var", "_wait_all"):
        assert hasattr(api, name), name
    for name in ("PythonUDF", "RPCExecMode", "_internal_rpc_pickler", "_build_rpc_profiling_key"):
        assert hasattr(internal, name), name
    assert internal._build_rpc_profiling_key(internal.RPCExecMode.ASYNC, "f", "a", "b") == (
        "rpc_async#f(a -> b)")
    assert api._default_pickler is internal._internal_rpc_pickler
    assert rpc.TensorPipeAgent is api._AgentView  # what _get_current_rpc_agent() returns


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))
