"""RPCs in PyTorch's legacy autograd profiler, as torch.distributed.rpc records them.

Each ``rpc_sync``, ``rpc_async`` and ``remote`` made while the legacy profiler
(``torch.autograd.profiler_legacy.profile``) is on records an event on the caller named
``rpc_sync#add(worker0 -> worker1)`` (``rpc_async#``, ``rpc_remote#``) that spans the call from
its send to its result (a ``remote``: its send), and asks the callee to profile its handling: the operators the callee
ran come back with the reply and join the caller's profile as remote events named
``<key>#remote_op: <operator>`` whose ``node_id`` is the callee's id (python/call_profiling.h).
A ``remote``'s operators come with its creation reply, which ``to_here()`` waits for.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch


def should_profile() -> bool:
    """Whether a profiler is on: the caller's event is recorded under any (the Kineto one,
    ``torch.profiler.profile``, included); remote events only come with the legacy one."""
    return torch.autograd._profiler_enabled()


def profiling_key(rpc_type: str, func: Callable[..., Any], qualified_name: Optional[str],
                  current: str, dst: str) -> str:
    if qualified_name is not None:
        name = qualified_name
    elif isinstance(func, torch.jit.ScriptFunction):
        name = torch._jit_internal._qualified_name(func)
    else:
        name = getattr(func, "__qualname__", repr(func))
    return f"rpc_{rpc_type}#{name}({current} -> {dst})"


def call_key(rpc_type: str, func: Callable[..., Any], current: str, dst: str) -> Optional[str]:
    """The call's event name if the legacy profiler is on, else None."""
    if not should_profile():
        return None
    return profiling_key(rpc_type, func, torch.jit._builtins._find_builtin(func), current, dst)


def record(key: str) -> torch.autograd.profiler.record_function:
    """The caller's event for the call named ``key``."""
    return torch.autograd.profiler.record_function(key)
