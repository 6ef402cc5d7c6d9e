"""Planted bug: the RRef protocol forgets to tell the owner when a user reference goes
(TETHER_SIM_PLANTED_RREF_BUGS=forget_user_delete), so the owner keeps a value nobody can reach:
a leaked RRef, reported by the owner's graceful shutdown."""
import os

import torch

import tether.rpc as rpc


def make(n):
    return torch.ones(n)


def main(rank, world_size):
    os.environ["TETHER_SIM_PLANTED_RREF_BUGS"] = "forget_user_delete"  # this worker only
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        rref = rpc.remote("worker1", make, args=(3,))
        assert rref.to_here().sum().item() == 3.0
        del rref
    rpc.shutdown()
