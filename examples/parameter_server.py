"""Parameter server with several trainers, batching updates with async_execution.

worker0 hosts the parameter server; workers 1..N-1 are trainers. Each trainer fetches the current
model through the server's RRef, computes gradients on its own synthetic data, and pushes them
with rpc_async; the server applies one optimizer step per batch of `world_size - 1` gradients,
and every trainer's push completes when that step is done (so no thread waits on the server).

Run for real:   /usr/bin/python3 examples/parameter_server.py [--world-size=3] [--steps=20]
"""
from __future__ import annotations

import os
import sys
import threading
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import backend_options, init_method_from_env, launch, parse_world_size, rpc_module  # noqa: E402

rpc = rpc_module()

IN_FEATURES = 16
OUT_FEATURES = 4
BATCH = 32


def true_weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(IN_FEATURES, OUT_FEATURES, generator=g)


class ParameterServer:
    """Holds the model; applies one SGD step per `batch_size` pushed gradients."""

    def __init__(self, batch_size: int, lr: float = 0.05):
        torch.manual_seed(0)
        self.model = nn.Linear(IN_FEATURES, OUT_FEATURES)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.batch_size = batch_size
        self.lock = threading.Lock()
        self.pending = 0
        self.steps = 0
        self.waiting = torch.futures.Future()
        self.pushes = 0
        self.recent_loss = float("nan")
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)

    def get_model(self) -> nn.Module:
        return self.model

    @staticmethod
    @rpc.functions.async_execution
    def push_and_fetch(ps_rref, grads: list[torch.Tensor], loss: float) -> torch.futures.Future:
        self = ps_rref.local_value()
        with self.lock:
            self.pushes += 1
            self.recent_loss = loss
            for p, g in zip(self.model.parameters(), grads):
                p.grad += g
            self.pending += 1
            fut = self.waiting
            if self.pending >= self.batch_size:
                for p in self.model.parameters():
                    p.grad /= self.batch_size
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=False)
                self.steps += 1
                self.pending = 0
                fut.set_result(self.model)
                self.waiting = torch.futures.Future()
        return fut


class Trainer:
    def __init__(self, ps_rref, rank: int):
        self.ps_rref = ps_rref
        self.generator = torch.Generator().manual_seed(100 + rank)
        self.w_true = true_weights()
        self.loss_fn = nn.MSELoss()

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(BATCH, IN_FEATURES, generator=self.generator)
        return x, x @ self.w_true

    def train(self, steps: int) -> list[float]:
        model = self.ps_rref.rpc_sync().get_model()
        losses = []
        for _ in range(steps):
            x, y = self.batch()
            model.zero_grad()
            loss = self.loss_fn(model(x), y)
            loss.backward()
            grads = [p.grad for p in model.parameters()]
            model = rpc.rpc_async(
                self.ps_rref.owner(), ParameterServer.push_and_fetch,
                args=(self.ps_rref, grads, loss.item()),
            ).wait()
            losses.append(loss.item())
        return losses


def run_trainer(ps_rref, rank: int, steps: int) -> list[float]:
    return Trainer(ps_rref, rank).train(steps)


def show_progress(ps: ParameterServer, steps: int, start: float, futs) -> None:
    """A live line: optimizer steps, recent loss, pushes per second."""
    while not all(f.done() for f in futs):
        elapsed = max(time.monotonic() - start, 1e-9)
        print(f"\r  step {ps.steps:>5}/{steps}  loss {ps.recent_loss:8.4f}  "
              f"{ps.pushes / elapsed:8.0f} pushes/s", end="", flush=True)
        time.sleep(0.2)
    print()


def main(rank: int, world_size: int, steps: int = 20, verbose: bool = True,
         live: bool = False) -> None:
    rpc.init_rpc(
        f"worker{rank}",
        rank=rank,
        world_size=world_size,
        rpc_backend_options=backend_options(init_method_from_env()),
    )
    if rank == 0:
        trainers = world_size - 1
        ps_rref = rpc.RRef(ParameterServer(batch_size=trainers))
        start = time.monotonic()
        futs = [
            rpc.rpc_async(f"worker{r}", run_trainer, args=(ps_rref, r, steps))
            for r in range(1, world_size)
        ]
        if live:
            show_progress(ps_rref.local_value(), steps, start, futs)
        curves = [f.wait() for f in futs]
        elapsed = time.monotonic() - start
        first = sum(c[0] for c in curves) / len(curves)
        last = sum(c[-1] for c in curves) / len(curves)
        ps = ps_rref.local_value()
        if verbose:
            print(
                f"parameter server: {ps.steps} steps, {trainers} trainers, "
                f"loss {first:.4f} -> {last:.4f}, {elapsed:.2f}s"
            )
        assert ps.steps == steps, f"expected {steps} optimizer steps, server made {ps.steps}"
        assert last < first, f"loss did not decrease: {first} -> {last}"
    rpc.shutdown()


if __name__ == "__main__":
    steps = 20
    for a in sys.argv[1:]:
        if a.startswith("--steps="):
            steps = int(a.split("=", 1)[1])
    launch(main, parse_world_size(sys.argv[1:], 3), steps=steps, live="--live" in sys.argv)
