"""Programs for real_runs_test: each is main(rank, world_size) launched as real processes."""
import os
import time

import torch

import tether.rpc as rpc


def _init(rank, world_size):
    opts = rpc.TensorPipeRpcBackendOptions(init_method=os.environ["TETHER_EXAMPLE_INIT_METHOD"],
                                           rpc_timeout=30)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size, rpc_backend_options=opts)


def double(x):
    return x * 2


def fail():
    raise ValueError("raised on purpose")


def traced(rank, world_size):
    _init(rank, world_size)
    # A reference owned by the next worker: its RRef events go on both workers' tracks.
    rref = rpc.remote(f"worker{(rank + 1) % world_size}", double, args=(torch.ones(2),))
    assert rref.to_here().tolist() == [2, 2]
    for peer in range(world_size):
        if peer != rank:
            assert rpc.rpc_sync(f"worker{peer}", double, args=(torch.ones(2),)).tolist() == [2, 2]
    # One call whose function raises, one that times out: error markers.
    try:
        rpc.rpc_sync(f"worker{(rank + 1) % world_size}", fail)
    except ValueError as e:
        assert "raised on purpose" in str(e), str(e)
    else:
        raise AssertionError("the call should have raised")
    try:
        rpc.rpc_sync(f"worker{(rank + 1) % world_size}", time.sleep, args=(1.0,), timeout=0.1)
    except RuntimeError as e:
        assert "RPC ran for more than set timeout" in str(e), str(e)
    else:
        raise AssertionError("the call should have timed out")
    summary = rpc._worker_summary()
    assert f"worker '{f'worker{rank}'}'" in summary and "calls in flight: 0" in summary, summary
    del rref
    rpc.shutdown()


def first_send_fails(rank, world_size):
    if rank == 0:  # Only worker0's first PYTHON_CALL fails.
        os.environ["TETHER_FAULTY_MESSAGES"] = "PYTHON_CALL"
        os.environ["TETHER_NUM_FAIL_SENDS"] = "1"
    _init(rank, world_size)
    if rank == 0:
        try:
            rpc.rpc_sync("worker1", double, args=(torch.ones(1),))
        except RuntimeError as e:
            assert "failed intentionally for PYTHON_CALL" in str(e), str(e)
        else:
            raise AssertionError("the first PYTHON_CALL should have failed")
        assert rpc.rpc_sync("worker1", double, args=(torch.ones(1),)).item() == 2.0
    rpc.shutdown()


def profiled(rank, world_size):
    _init(rank, world_size)
    if rank == 0:
        with torch.autograd.profiler_legacy.profile() as prof:
            rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 1))
            rpc.rpc_async("worker1", double, args=(torch.ones(2),)).wait()
            rpc.remote("worker1", double, args=(torch.ones(2),)).to_here()
        names = {e.name for e in prof.function_events}
        for want in ("rpc_sync#aten::add(worker0 -> worker1)",
                     "rpc_async#double(worker0 -> worker1)",
                     "rpc_remote#double(worker0 -> worker1)"):
            assert want in names, (want, sorted(names)[:30])
    rpc.shutdown()
