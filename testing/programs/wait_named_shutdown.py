"""Planted bug: worker1 waits for ever on an event its code calls shutdown_requested, before it
calls rpc.shutdown() (a hang, though its line says "shutdown"); worker0 waits in the graceful
shutdown barrier for worker1 for ever (a shutdown that never finishes)."""
import threading

import tether.rpc as rpc

shutdown_requested = threading.Event()


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 1:
        shutdown_requested.wait()  # never set
    rpc.shutdown()
