"""A parameter server written for PyTorch's RPC, as PyTorch's tutorials write one (the
"Implementing a Parameter Server Using Distributed RPC Framework" pattern): rank 0 hosts the
model, the other ranks train it with distributed autograd and a DistributedOptimizer whose
parameters are RRefs owned by the server. Nothing here names Tether.

    python examples/torch/parameter_server.py --world-size=3 --steps=10    # PyTorch's RPC
    python -m tether.run examples/torch/parameter_server.py --world-size=3 # the same, on Tether

It starts its own workers with torch.multiprocessing.spawn and rendezvous through a file, so
it needs no launcher. Each trainer prints its RPC module and its first and last losses.
"""
import argparse
import os
import tempfile
import threading

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.optim import DistributedOptimizer

IN_FEATURES, OUT_FEATURES, BATCH = 8, 2, 16


class ParameterServer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Linear(IN_FEATURES, OUT_FEATURES)
        self.lock = threading.Lock()

    def forward(self, x):
        with self.lock:
            return self.model(x)

    def param_rrefs(self):
        return [rpc.RRef(p) for p in self.model.parameters()]


_server = None
_server_lock = threading.Lock()


def get_server():
    """The one ParameterServer of this process (rank 0), created by the first trainer's call."""
    global _server
    with _server_lock:
        if _server is None:
            _server = ParameterServer()
        return _server


def remote_forward(server_rref, x):
    return server_rref.local_value()(x)


class TrainerNet(nn.Module):
    """The trainer's view of the model: forward runs on the server."""

    def __init__(self):
        super().__init__()
        self.server_rref = rpc.remote("ps", get_server)

    def forward(self, x):
        return rpc.rpc_sync("ps", remote_forward, args=(self.server_rref, x))

    def param_rrefs(self):
        return self.server_rref.rpc_sync().param_rrefs()


def train(rank, steps):
    net = TrainerNet()
    opt = DistributedOptimizer(torch.optim.SGD, net.param_rrefs(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    w_true = torch.randn(IN_FEATURES, OUT_FEATURES, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(steps):
        x = torch.randn(BATCH, IN_FEATURES, generator=g)
        with dist_autograd.context() as context_id:
            loss = nn.functional.mse_loss(net(x), x @ w_true)
            dist_autograd.backward(context_id, [loss])
            opt.step(context_id)
        losses.append(loss.item())
    print(f"trainer{rank}: rpc={rpc.__name__} autograd={dist_autograd.__name__} "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True)


def run_worker(rank, world_size, init_method, steps):
    options = rpc.TensorPipeRpcBackendOptions(init_method=init_method, rpc_timeout=120)
    name = "ps" if rank == 0 else f"trainer{rank}"
    rpc.init_rpc(name, rank=rank, world_size=world_size, rpc_backend_options=options)
    if rank != 0:
        train(rank, steps)
    rpc.shutdown()  # The server serves until every trainer is done.


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--world-size", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init_method = "file://" + os.path.join(tmp, "rendezvous")
        mp.spawn(run_worker, args=(args.world_size, init_method, args.steps),
                 nprocs=args.world_size, join=True)
