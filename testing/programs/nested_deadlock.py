"""Planted bug: a deadlock through nested calls. worker1 serves with a single thread; its
handler blocks on a call back to worker0, whose handler needs worker1 again."""
import tether.rpc as rpc


def leaf():
    return "leaf"


def on_worker0():
    return rpc.rpc_sync("worker1", leaf)  # worker1's only thread is busy in on_worker1


def on_worker1():
    return rpc.rpc_sync("worker0", on_worker0)


def main(rank, world_size):
    opts = rpc.TensorPipeRpcBackendOptions(num_worker_threads=1, rpc_timeout=0)
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size, rpc_backend_options=opts)
    if rank == 0:
        rpc.rpc_sync("worker1", on_worker1)
    rpc.shutdown()
