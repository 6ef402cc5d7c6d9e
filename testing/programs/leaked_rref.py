"""Planted bug: the RRef protocol forgets idempotence (TETHER_SIM_PLANTED_RREF_BUGS), so under
duplicated messages an owner keeps a value no user can reach: a leaked RRef."""
import os

import torch

import tether.rpc as rpc

os.environ.setdefault("TETHER_SIM_PLANTED_RREF_BUGS", "forget_idempotence")

# Run it with fork requests slower than their retry timeout, so that each is retried:
#   python3 -m tether.sim leaked_rref.py --world-size 3 --faults type=RREF_FORK_REQUEST:delay=8s


def make(n):
    return torch.ones(n)


def total(rrefs):
    return sum(r.to_here().sum().item() for r in rrefs)


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        rrefs = [rpc.remote("worker1", make, args=(i + 1,)) for i in range(6)]
        assert rpc.rpc_sync("worker2", total, args=(rrefs,)) == 21.0
        del rrefs
    rpc.shutdown()
