"""Model parallelism written for PyTorch's RPC and launched by torchrun: every rank runs this
file, reading RANK and WORLD_SIZE from the environment and meeting through env:// (MASTER_ADDR,
MASTER_PORT), as torchrun sets them. Rank 0 owns the input layer and drives training; each
other rank owns one stage whose parameters it holds; the backward pass and the optimizer step
run across them (distributed autograd, DistributedOptimizer). Nothing here names Tether.

    python -m torch.distributed.run --nproc_per_node=3 --redirects 1 --tee 1 \
        examples/torch/torchrun_model_parallel.py                                  # PyTorch's
    python -m torch.distributed.run --nproc_per_node=3 --redirects 1 --tee 1 \
        -m tether.run examples/torch/torchrun_model_parallel.py                    # Tether's
    python -m tether.sim examples/torch/torchrun_model_parallel.py --world-size 3 --seeds 1..20

(`python -m torch.distributed.run` is torchrun; Debian's needs `--redirects 1 --tee 1` on Python
3.11.) An optional argument sets the number of steps. Rank 0 prints its RPC module and the loss,
which falls step after step.
"""
import os
import sys

import torch
import torch.distributed.autograd as dist_autograd
import torch.distributed.rpc as rpc
from torch import nn
from torch.distributed.optim import DistributedOptimizer

STEPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
WIDTH = 4


class Stage(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return torch.tanh(self.layer(x))

    def param_rrefs(self):
        return [rpc.RRef(p) for p in self.parameters()]


def stage_forward(stage_rref, x):
    return stage_rref.local_value()(x)


def stage_params(stage_rref):
    return stage_rref.local_value().param_rrefs()


def main():
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    rpc.init_rpc(f"worker{rank}", rank=rank, world_size=world_size)
    if rank == 0:
        stages = [rpc.remote(f"worker{r}", Stage, args=(r,)) for r in range(1, world_size)]
        params = [p for s in stages for p in rpc.rpc_sync(s.owner(), stage_params, args=(s,))]
        opt = DistributedOptimizer(torch.optim.SGD, params, lr=0.2)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(8, WIDTH, generator=g)
        target = torch.zeros(8, WIDTH)
        losses = []
        for _ in range(STEPS):
            with dist_autograd.context() as context_id:
                h = x
                for s in stages:
                    h = rpc.rpc_sync(s.owner(), stage_forward, args=(s, h))
                loss = ((h - target) ** 2).mean()
                dist_autograd.backward(context_id, [loss])
                opt.step(context_id)
            losses.append(loss.item())
        print(f"rank 0: rpc={rpc.__name__} losses " + " ".join(f"{v:.4f}" for v in losses),
              flush=True)
        if not losses[-1] < losses[0]:
            sys.exit(f"the loss did not fall: {losses}")
    rpc.shutdown()


if __name__ == "__main__":
    main()
