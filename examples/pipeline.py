"""A model split across two workers as a pipeline of stages called over RPC.

worker0 drives; worker1 holds the first stage and worker2 the second (created with `remote()`).
Each batch is cut into micro-batches that flow through the stages concurrently: stage one's
output goes to stage two, which computes the loss, steps its own optimizer and returns the
gradient of its input; the driver hands that gradient back to stage one, which finishes the
backward pass and steps. Every call is asynchronous, so micro-batches overlap.

Run for real:   /usr/bin/python3 examples/pipeline.py [--steps=15] [--micro-batches=4]
"""
from __future__ import annotations

import os
import sys
import threading

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import backend_options, init_method_from_env, launch, rpc_module  # noqa: E402

rpc = rpc_module()

IN, HIDDEN, OUT = 12, 32, 3


class StageOne:
    def __init__(self):
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU())
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.05)
        self.lock = threading.Lock()
        self.saved: dict[int, torch.Tensor] = {}

    def forward(self, micro_id: int, x: torch.Tensor) -> torch.Tensor:
        with self.lock:
            out = self.net(x)
            self.saved[micro_id] = out
            return out.detach()

    def backward(self, micro_id: int, grad: torch.Tensor) -> None:
        with self.lock:
            self.saved.pop(micro_id).backward(grad)

    def step(self) -> None:
        with self.lock:
            self.optimizer.step()
            self.optimizer.zero_grad()


class StageTwo:
    def __init__(self):
        torch.manual_seed(2)
        self.net = nn.Linear(HIDDEN, OUT)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.05)
        self.lock = threading.Lock()

    def forward_loss(self, h: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        with self.lock:
            h = h.requires_grad_()
            loss = nn.functional.cross_entropy(self.net(h), y)
            loss.backward()
            return loss.item(), h.grad

    def step(self) -> None:
        with self.lock:
            self.optimizer.step()
            self.optimizer.zero_grad()


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, IN, generator=g)
    centers = torch.randn(OUT, IN, generator=g)
    y = torch.cdist(x, centers).argmin(dim=1)
    return x, y


def main(rank: int, world_size: int, steps: int = 15, micro_batches: int = 4,
         verbose: bool = True) -> None:
    rpc.init_rpc(
        f"worker{rank}",
        rank=rank,
        world_size=world_size,
        rpc_backend_options=backend_options(init_method_from_env()),
    )
    if rank == 0:
        one = rpc.remote("worker1", StageOne)
        two = rpc.remote("worker2", StageTwo)
        x, y = make_data(256)
        losses = []
        for step in range(steps):
            futs = []
            for m, (xm, ym) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches))):
                micro_id = step * micro_batches + m
                h = one.rpc_async().forward(micro_id, xm)
                stage_two = h.then(lambda f, ym=ym: two.rpc_async().forward_loss(f.wait(), ym))
                futs.append((micro_id, stage_two))
            step_loss = 0.0
            backwards = []
            for micro_id, fut in futs:
                loss, grad = fut.wait().wait()
                step_loss += loss / micro_batches
                backwards.append(one.rpc_async().backward(micro_id, grad))
            torch.futures.wait_all(backwards)
            torch.futures.wait_all([one.rpc_async().step(), two.rpc_async().step()])
            losses.append(step_loss)
        if verbose:
            print(f"pipeline: {steps} steps x {micro_batches} micro-batches, "
                  f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        assert losses[-1] < losses[0], f"loss did not decrease: {losses[0]} -> {losses[-1]}"
    rpc.shutdown()


if __name__ == "__main__":
    kw = {}
    for a in sys.argv[1:]:
        if a.startswith("--steps="):
            kw["steps"] = int(a.split("=", 1)[1])
        if a.startswith("--micro-batches="):
            kw["micro_batches"] = int(a.split("=", 1)[1])
    launch(main, 3, **kw)
