"""Planted bug: worker1's main returns with RPC still up (it never calls rpc.shutdown())."""
import tether.rpc as rpc


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        rpc.shutdown()
