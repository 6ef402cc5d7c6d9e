"""Runs an example's `main(rank, world_size)` as one process per worker on this machine.

Examples are written for `tether.rpc`. Set TETHER_EXAMPLES_BACKEND=torch to run the very same
code on `torch.distributed.rpc` instead (porting is a change of import, both ways).
"""
from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import sys
import tempfile
from typing import Callable, Sequence


def rpc_module():
    """The RPC module the examples use: tether.rpc, or torch's when asked for."""
    if os.environ.get("TETHER_EXAMPLES_BACKEND") == "torch":
        return importlib.import_module("torch.distributed.rpc")
    import torch  # noqa: F401  (tether's extension needs torch loaded first)

    return importlib.import_module("tether.rpc")


def autograd_module():
    """Distributed autograd for the same backend: tether.autograd or torch.distributed.autograd."""
    if os.environ.get("TETHER_EXAMPLES_BACKEND") == "torch":
        return importlib.import_module("torch.distributed.autograd")
    return importlib.import_module("tether.autograd")


def optim_module():
    """DistributedOptimizer's module for the same backend: tether.optim or torch.distributed.optim."""
    if os.environ.get("TETHER_EXAMPLES_BACKEND") == "torch":
        return importlib.import_module("torch.distributed.optim")
    return importlib.import_module("tether.optim")


def backend_options(init_method: str | None, num_worker_threads: int = 8):
    rpc = rpc_module()
    if init_method is None:
        return None
    return rpc.TensorPipeRpcBackendOptions(
        init_method=init_method, num_worker_threads=num_worker_threads, rpc_timeout=60
    )


def _child(target: Callable[..., None], rank: int, world_size: int, init_method: str, kwargs):
    os.environ["TETHER_EXAMPLE_INIT_METHOD"] = init_method
    target(rank, world_size, **kwargs)


def launch(target: Callable[..., None], world_size: int, timeout: float = 300.0, **kwargs) -> None:
    """Starts `target(rank, world_size, **kwargs)` in `world_size` processes and waits for all.

    Raises SystemExit with a message naming the ranks that failed.
    """
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_child, args=(target, r, world_size, init_method, kwargs))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        failed = []
        for r, p in enumerate(procs):
            if p.is_alive():
                p.kill()
                p.join()
                failed.append(f"rank {r} hung")
            elif p.exitcode != 0:
                failed.append(f"rank {r} exited with {p.exitcode}")
        if failed:
            raise SystemExit("example failed: " + ", ".join(failed))


def init_method_from_env() -> str | None:
    """The rendezvous a launched worker uses; None under tether.sim (which needs none)."""
    return os.environ.get("TETHER_EXAMPLE_INIT_METHOD")


def parse_world_size(argv: Sequence[str], default: int) -> int:
    for a in argv:
        if a.startswith("--world-size="):
            return int(a.split("=", 1)[1])
    return default


if __name__ == "__main__":
    sys.exit("launch.py is a helper; run an example instead")
