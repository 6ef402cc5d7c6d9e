"""`DistributedOptimizer` over Tether: a drop-in for `torch.distributed.optim`.

    opt = tether.optim.DistributedOptimizer(torch.optim.SGD, param_rrefs, lr=0.05)
    with tether.autograd.context() as context_id:
        ...
        tether.autograd.backward(context_id, [loss])
        opt.step(context_id)

Each owner of parameters gets one local optimizer, created with `rpc_async`; `step(context_id)`
runs every owner's step concurrently on that context's gradients (`get_gradients`, never
`.grad` of other contexts). As in PyTorch, the functional path is chosen only when TorchScript is
enabled (`torch.jit._state._enabled`, off with `PYTORCH_JIT=0`) in the creating process and the
optimizer class has a functional form (SGD, Adam, ...): the owner then runs the functional
TorchScript optimizer's class eagerly (in Python, under the GIL; not compiled), with no lock and
no `.grad`. Otherwise
the class runs as itself, under one lock per worker, on `.grad` set from the context, and a
warning is logged.
"""
import logging
import threading
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
from torch.distributed.optim.utils import functional_optim_map

from tether import autograd as dist_autograd
from tether import rpc

__all__ = ["DistributedOptimizer"]

logger = logging.getLogger(__name__)


class _OwnerOptimizer:
    """The optimizer of one owner's parameters (lives on the owner, behind an RRef)."""

    # Optimizers of this class share the parameters' .grad: one step at a time per worker.
    _grad_lock = threading.Lock()

    def __init__(self, optimizer_class, functional: bool, param_rrefs, *args, **kwargs):
        self._params: List[torch.Tensor] = [p.local_value() for p in param_rrefs]
        self._functional = functional
        self._optim = optimizer_class(self._params, *args, **kwargs)

    def step(self, context_id: int) -> None:
        grads = dist_autograd.get_gradients(context_id)
        if self._functional:
            local: List[Optional[torch.Tensor]] = [grads.get(p) for p in self._params]
            self._optim.step(local)
            return
        with _OwnerOptimizer._grad_lock:
            for param, grad in grads.items():
                param.grad = grad
            self._optim.step()


def _create_owner_optimizer(optimizer_class, functional, param_rrefs, *args, **kwargs):
    return rpc.RRef(_OwnerOptimizer(optimizer_class, functional, param_rrefs, *args, **kwargs))


def _owner_step(optimizer_rref, context_id: int) -> None:
    optimizer_rref.local_value().step(context_id)


def _wait_all(futures) -> List[Any]:
    """Waits for every future; raises the last error, if any, once all are done."""
    results: List[Any] = []
    error: Optional[BaseException] = None
    for fut in futures:
        try:
            results.append(fut.wait())
        except Exception as e:  # noqa: BLE001 (re-raised below)
            results.append(e)
            error = e
    if error is not None:
        raise error
    return results


def _optimizer_constructor(optimizer_class: type) -> type:
    """The class each owner instantiates: the functional form of `optimizer_class` when
    TorchScript is enabled in this process and there is one, else `optimizer_class` itself."""
    functional_class = functional_optim_map.get(optimizer_class)
    if functional_class is not None and torch.jit._state._enabled:
        return functional_class
    return optimizer_class


class DistributedOptimizer:
    """Applies `optimizer_class` on each worker to the parameters it owns, from the gradients
    of a distributed autograd context. Concurrent steps are serialized per worker for
    non-functional optimizers; nothing orders steps across workers."""

    def __init__(self, optimizer_class, params_rref, *args, **kwargs):
        torch._C._log_api_usage_once("tether.optim.DistributedOptimizer")
        by_owner: Dict[Any, list] = defaultdict(list)
        for param in params_rref:
            by_owner[param.owner()].append(param)
        ctor = _optimizer_constructor(optimizer_class)
        self.is_functional_optim: bool = ctor is not optimizer_class
        if not self.is_functional_optim:
            logger.warning(
                "Creating the optimizer %s without TorchScript support: each worker runs its "
                "steps one at a time, holding the Python GIL, which may slow multithreaded "
                "training (e.g. distributed model parallel on CPU)",
                optimizer_class,
            )
        futures = [
            rpc.rpc_async(
                owner,
                _create_owner_optimizer,
                args=(ctor, self.is_functional_optim, rrefs) + args,
                kwargs=kwargs,
            )
            for owner, rrefs in by_owner.items()
        ]
        self.remote_optimizers = _wait_all(futures)

    def step(self, context_id: int) -> None:
        """One optimizer step on every owner with the gradients of `context_id`; blocks until
        every owner is done and raises the last error any of them raised."""
        dist_autograd._is_valid_context(context_id)
        futures = [
            rpc.rpc_async(optimizer.owner(), _owner_step, args=(optimizer, context_id))
            for optimizer in self.remote_optimizers
        ]
        _wait_all(futures)
