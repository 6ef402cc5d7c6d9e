"""Per-rank bodies of the lifecycle tests (run in spawned processes by harness.run_group)."""
import os
import socket
import time

import pytest
import torch

import tether.rpc as rpc

import harness
import rpc_funcs as f


def duplicate_name(rank, world_size, init_method):
    with pytest.raises(RuntimeError, match="is not unique"):
        rpc.init_rpc("dup", rank=rank, world_size=world_size,
                     rpc_backend_options=harness.options(init_method))
    assert not rpc.api._C.is_initialized()
    return "ok"


def reinit_and_call_after_shutdown(rank, world_size, init_method):
    opts = harness.options(init_method)
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=opts)
    with pytest.raises(RuntimeError, match="is already initialized"):
        rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                     rpc_backend_options=opts)
    peer = harness.worker_name((rank + 1) % world_size)
    assert rpc.rpc_sync(peer, f.add, args=(rank, 1)) == rank + 1
    rpc.shutdown()
    with pytest.raises(RuntimeError, match="^RPC has not been initialized"):
        rpc.rpc_sync(peer, f.noop)
    with pytest.raises(RuntimeError, match="^RPC has not been initialized"):
        rpc.get_worker_info()
    with pytest.raises(RuntimeError, match="RPC has not been initialized"):
        rpc.RRef(1)
    return "ok"


def reinit_after_shutdown(rank, world_size, init_method):
    # A second run in the same processes, with a new rendezvous file.
    first, second = init_method + "_a", init_method + "_b"
    for url in (first, second):
        rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                     rpc_backend_options=harness.options(url))
        assert rpc.rpc_sync(harness.worker_name(1 - rank), f.add, args=(1, 1)) == 2
        rpc.shutdown()
    return "ok"


def ungraceful_shutdown_fails_pending_calls(rank, world_size, init_method):
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=harness.options(init_method))
    if rank == 0:
        fut = rpc.rpc_async("worker1", f.sleep, args=(3,), timeout=0)
        rpc.shutdown(graceful=False)
        with pytest.raises(RuntimeError):
            fut.wait()
    else:
        time.sleep(4)
        rpc.shutdown(graceful=False)
    return "ok"


def local_shutdown_right_away(rank, world_size, init_method):
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=harness.options(init_method))
    rpc.shutdown(graceful=False)
    return "ok"


def peer_crash_fails_only_its_calls(rank, world_size, init_method):
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=harness.options(init_method))
    if rank == 2:
        time.sleep(0.5)
        os._exit(0)  # crash: no shutdown
    if rank == 0:
        fut = rpc.rpc_async("worker2", f.sleep, args=(30,), timeout=0)
        with pytest.raises(RuntimeError):
            fut.wait()
        # The surviving worker is unaffected.
        assert rpc.rpc_sync("worker1", f.add, args=(2, 2)) == 4
        with pytest.raises(RuntimeError):
            rpc.rpc_sync("worker2", f.noop)
        rpc.rpc_sync("worker1", f.noop)
    else:
        time.sleep(2)
    rpc.shutdown(graceful=False)
    return "ok"


def tcp_rendezvous_with_auth_token(rank, world_size, init_method):
    opts = rpc.TetherRpcBackendOptions(init_method=init_method, auth_token="s3cret",
                                       num_worker_threads=2, rpc_timeout=20)
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=opts)
    assert rpc.get_rpc_timeout() == 20
    assert rpc._get_debug_info()["agent.thread_pool_size"] == "2"
    peer = harness.worker_name((rank + 1) % world_size)
    out = rpc.rpc_sync(peer, torch.add, args=(torch.ones(2), rank))
    rpc.shutdown()
    return out.tolist()


def env_rendezvous(rank, world_size, init_method):
    port = init_method  # passed through: the free port
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size)
    names = sorted(w.name for w in rpc.api._get_current_rpc_agent().get_worker_infos())
    rpc.shutdown()
    return names


def rref_fork_chain_and_graceful_shutdown(rank, world_size, init_method):
    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=harness.options(init_method))
    if rank == 0:
        rref = rpc.remote("worker1", f.add, args=(torch.ones(2), 2))
        # worker0 (user) -> worker2 (user) -> worker1 (owner's local value)
        out = rpc.rpc_sync("worker2", f.forward_rref, args=("worker1", rref))
        assert torch.equal(out, torch.full((2,), 3.0))
        # A user held by worker2 across the shutdown barrier is released by shutdown.
        assert rpc.rpc_sync("worker2", f.hold_rref, args=(rref,)) == 1
    rpc.shutdown()
    return "ok"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
