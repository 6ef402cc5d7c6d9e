"""Not simulatable: the worker starts a thread of its own."""
import threading

import tether.rpc as rpc


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        threading.Thread(target=print, name="background").start()
    rpc.shutdown()
