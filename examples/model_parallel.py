"""Model-parallel training with distributed autograd and DistributedOptimizer.

A three-layer classifier is split across three workers: worker0 drives and holds the input layer,
worker1 and worker2 each hold one later layer, created with `remote()`. Every step runs the
forward pass through the remote layers inside a distributed autograd context, computes the loss
on worker0, runs `dist_autograd.backward` across all three workers, and steps every layer's
parameters with one `DistributedOptimizer` (SGD with momentum). After every step the driver
checks the parameters against the same model trained in one process (same initial weights, same
data) to 1e-6: the distributed gradients are the local ones.

Run for real:   /usr/bin/python3 examples/model_parallel.py [--steps=10]
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import (  # noqa: E402
    autograd_module,
    backend_options,
    init_method_from_env,
    launch,
    optim_module,
    rpc_module,
)

rpc = rpc_module()
dist_autograd = autograd_module()
DistributedOptimizer = optim_module().DistributedOptimizer

IN, HIDDEN, OUT = 10, 24, 4
LR, MOMENTUM = 0.05, 0.9


def make_layers() -> list[nn.Module]:
    """The whole model, layer by layer, with fixed initial weights."""
    torch.manual_seed(3)
    return [
        nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh()),
        nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU()),
        nn.Linear(HIDDEN, OUT),
    ]


class Stage(nn.Module):
    """One layer of the model, living on the worker that created it."""

    def __init__(self, index: int):
        super().__init__()
        self.layer = make_layers()[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def parameter_rrefs(self) -> list:
        return [rpc.RRef(p) for p in self.layer.parameters()]

    def parameters_copy(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.layer.parameters()]


def make_data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, IN, generator=g)
    centers = torch.randn(OUT, IN, generator=g)
    return x, torch.cdist(x, centers).argmin(dim=1)


def check_close(name: str, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want):
        if not torch.allclose(g, w, atol=1e-6, rtol=1e-6):
            raise AssertionError(f"{name}: distributed training diverged from local training "
                                 f"(max difference {(g - w).abs().max().item():.3g})")


def main(rank: int, world_size: int, steps: int = 10, batch: int = 32,
         verbose: bool = True) -> None:
    rpc.init_rpc(
        f"worker{rank}",
        rank=rank,
        world_size=world_size,
        rpc_backend_options=backend_options(init_method_from_env()),
    )
    if rank == 0:
        first = make_layers()[0]
        stages = [rpc.remote("worker1", Stage, args=(1,)), rpc.remote("worker2", Stage, args=(2,))]
        params = [rpc.RRef(p) for p in first.parameters()]
        for stage in stages:
            params.extend(stage.rpc_sync().parameter_rrefs())
        optimizer = DistributedOptimizer(torch.optim.SGD, params, lr=LR, momentum=MOMENTUM)

        local = nn.Sequential(*make_layers())
        local_optimizer = torch.optim.SGD(local.parameters(), lr=LR, momentum=MOMENTUM)

        x, y = make_data(steps * batch)
        with torch.no_grad():
            loss_before = nn.functional.cross_entropy(local(x), y).item()
        losses = []
        for step in range(steps):
            xb, yb = x[step * batch:(step + 1) * batch], y[step * batch:(step + 1) * batch]
            with dist_autograd.context() as context_id:
                h = first(xb)
                for stage in stages:
                    h = stage.rpc_sync().forward(h)
                loss = nn.functional.cross_entropy(h, yb)
                dist_autograd.backward(context_id, [loss])
                optimizer.step(context_id)
            losses.append(loss.item())

            local_optimizer.zero_grad()
            local_loss = nn.functional.cross_entropy(local(xb), yb)
            local_loss.backward()
            local_optimizer.step()
            check_close(f"step {step} loss", [loss.detach()], [local_loss.detach()])
            check_close(f"step {step} layer 0", [p.detach() for p in first.parameters()],
                        [p.detach() for p in local[0].parameters()])
            for i, stage in enumerate(stages, start=1):
                check_close(f"step {step} layer {i}", stage.rpc_sync().parameters_copy(),
                            [p.detach() for p in local[i].parameters()])
        # The distributed model equals `local` (checked above): its loss over all the data.
        with torch.no_grad():
            loss_after = nn.functional.cross_entropy(local(x), y).item()
        if verbose:
            print(f"model_parallel: {steps} steps, loss {loss_before:.4f} -> {loss_after:.4f}, "
                  "parameters equal to local training at every step")
        assert loss_after < loss_before, f"loss did not decrease: {loss_before} -> {loss_after}"
    rpc.shutdown()


if __name__ == "__main__":
    kw = {}
    for a in sys.argv[1:]:
        if a.startswith("--steps="):
            kw["steps"] = int(a.split("=", 1)[1])
    launch(main, 3, **kw)
