"""Planted bug: a call without a timeout to a server that never answers it."""
import threading

import tether.rpc as rpc

never = threading.Event()


def wait_forever():
    never.wait()


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        rpc.rpc_sync("worker1", wait_forever, timeout=0)  # the bug: no timeout
    rpc.shutdown()
