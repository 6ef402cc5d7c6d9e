"""Planted bug: worker1's main raises after a successful call."""
import tether.rpc as rpc


def ping():
    return "pong"


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 1:
        assert rpc.rpc_sync("worker0", ping) == "pong"
        rpc.shutdown()
        raise ValueError("planted: the answer was wrong")
    rpc.shutdown()
