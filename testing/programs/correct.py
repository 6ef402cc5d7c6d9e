"""A correct tether.rpc program: calls of every kind, RRefs passed around, clean shutdown.
Each worker counts the calls it served in a module global, as a real process would."""
import torch

import tether.rpc as rpc

served = 0


def bump(x):
    global served
    served += 1
    return x + 1


def served_count():
    return served


def add_rref(rref, y):
    return rref.to_here() + y


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size,
                 rpc_backend_options=rpc.TensorPipeRpcBackendOptions(rpc_timeout=20))
    peer = f"worker{(rank + 1) % world_size}"
    futs = [rpc.rpc_async(peer, bump, args=(torch.full((2,), float(i)),)) for i in range(4)]
    assert [f.wait()[0].item() for f in futs] == [1.0, 2.0, 3.0, 4.0]
    assert rpc.rpc_sync(peer, torch.add, args=(torch.ones(2), 2)).tolist() == [3.0, 3.0]
    rref = rpc.remote(peer, bump, args=(torch.zeros(1),))
    third = f"worker{(rank + 2) % world_size}"
    assert rpc.rpc_sync(third, add_rref, args=(rref, 10)).item() == 11.0
    assert rref.to_here().item() == 1.0
    rpc.shutdown()
    # Each worker served its predecessor's 4 calls and one remote(): its own count.
    assert served == 5, served
