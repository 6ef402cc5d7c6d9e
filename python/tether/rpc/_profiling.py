"""RPCs in PyTorch's legacy autograd profiler, named as torch.distributed.rpc names them:
``rpc_sync#add(worker0 -> worker1)``, ``rpc_async#...``, ``remote#...``.

Only the caller's side is recorded: the event spans the call, from its send to its result.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch


def should_profile() -> bool:
    """Whether the legacy profiler (the one PyTorch 1.13's RPC records into) is on."""
    if not torch.autograd._profiler_enabled():
        return False
    active = torch._C._profiler.ActiveProfilerType
    return torch._C._autograd._profiler_type() == active.LEGACY


def profiling_key(rpc_type: str, func: Callable[..., Any], qualified_name: Optional[str],
                  current: str, dst: str) -> str:
    if qualified_name is not None:
        name = qualified_name
    elif isinstance(func, torch.jit.ScriptFunction):
        name = torch._jit_internal._qualified_name(func)
    else:
        name = getattr(func, "__qualname__", repr(func))
    return f"rpc_{rpc_type}#{name}({current} -> {dst})"


def record(rpc_type: str, func: Callable[..., Any], current: str, dst: str):
    """A record_function context for the call, or a no-op one when not profiling."""
    if not should_profile():
        return contextlib.nullcontext()
    qualified = torch.jit._builtins._find_builtin(func)
    return torch.autograd.profiler.record_function(
        profiling_key(rpc_type, func, qualified, current, dst))
