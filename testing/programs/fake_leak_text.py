"""Not a leak: worker1's own RuntimeError reads like tether's leak and missed-shutdown reports,
but it is an ordinary exception (tether.sim classifies by kind, not by text)."""
import tether.rpc as rpc

TEXT = ("RRef leak on worker 'worker1': 1 reference(s) alive after a graceful shutdown; "
        "the worker's main function returned without calling rpc.shutdown()")


def main(rank, world_size):
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    rpc.shutdown()
    if rank == 1:
        raise RuntimeError(TEXT)
