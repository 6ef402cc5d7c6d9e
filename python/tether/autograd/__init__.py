"""Distributed autograd over Tether: a drop-in for `torch.distributed.autograd`.

Calls made inside a `context()` record send and receive functions in the autograd graph on both
sides; `backward(context_id, roots)` then runs the whole distributed graph (FAST mode, as
PyTorch's), and every worker's gradients go into the context, read with `get_gradients`, not into
`.grad`.

    with tether.autograd.context() as context_id:
        loss = rpc.rpc_sync("worker1", torch.add, args=(t1, t2)).sum()
        tether.autograd.backward(context_id, [loss])
        grads = tether.autograd.get_gradients(context_id)   # {t1: ..., t2: ...}

Differences from PyTorch are listed in python/README.md.
"""
from typing import Dict, List

import torch

from tether import _C

__all__ = [
    "DistAutogradContext",
    "backward",
    "context",
    "get_gradients",
    "is_available",
]

DistAutogradContext = _C.DistAutogradContext


def is_available() -> bool:
    return True


def backward(context_id: int, roots: List[torch.Tensor], retain_graph: bool = False) -> None:
    """Runs the backward pass of `context_id` from `roots` (scalars) across every worker the
    context's calls reached; blocks until every worker's part is done."""
    _C.autograd_backward(context_id, roots, retain_graph)


def get_gradients(context_id: int) -> Dict[torch.Tensor, torch.Tensor]:
    """This worker's gradients of `context_id`: leaf tensor -> accumulated gradient."""
    return _C.autograd_get_gradients(context_id)


def _init(worker_id: int) -> None:
    """`init_rpc` has done it; kept for programs that call PyTorch's private initializer."""
    _C.autograd_check_init(worker_id)


def _new_context() -> DistAutogradContext:
    return _C.autograd_new_context()


def _release_context(context_id: int) -> None:
    _C.autograd_release_context(context_id)


def _get_max_id() -> int:
    return _C.autograd_max_id()


def _is_valid_context(context_id: int) -> None:
    """Raises if `context_id` is not a live context on this worker."""
    _C.autograd_retrieve_context(context_id)


def _retrieve_context(context_id: int) -> DistAutogradContext:
    return _C.autograd_retrieve_context(context_id)


def _current_context() -> DistAutogradContext:
    return _C.autograd_current_context()


def _get_debug_info() -> Dict[str, int]:
    return _C.autograd_debug_info()


class context:
    """A distributed autograd context for the calls and the backward pass inside the `with`
    block; `__enter__` returns its id, `__exit__` releases it on every worker it reached."""

    def __enter__(self) -> int:
        self.autograd_context = _new_context()
        return self.autograd_context._context_id()

    def __exit__(self, type, value, traceback) -> None:
        _release_context(self.autograd_context._context_id())
