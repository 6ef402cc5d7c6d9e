"""Functions the tensor-view tests call remotely (importable by every worker process)."""
from typing import List, Tuple

import torch


def layout(*tensors):
    """Each tensor's (sizes, strides, storage offset, storage bytes), as the callee sees it."""
    return [(tuple(t.shape), t.stride(), t.storage_offset(), t.storage().nbytes()) for t in tensors]


def storage_ptrs(*tensors):
    return [t.storage().data_ptr() for t in tensors]


def echo(*tensors):
    return tensors


def write_through(a, b):
    """Writes b[0] and returns what `a` sees at b's first element, plus whether they share."""
    b[0] = 100.0
    return a[b.storage_offset() - a.storage_offset()].item(), storage_ptrs(a, b)


def views_of_big():
    """A small slice, a dense block and a large view of one 4 MB tensor made on the callee."""
    big = torch.arange(1_000_000, dtype=torch.float32)
    return big[10:20], big.view(1000, 1000)[:2].t(), big[1:600001]


@torch.jit.script
def script_views(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return x, x[1:]


@torch.jit.script
def script_layout(x: torch.Tensor) -> List[int]:
    return x.stride() + [x.storage_offset()]
