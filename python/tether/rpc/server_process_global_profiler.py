"""The server-process profiler: ``tether.rpc._server_process_global_profile``, as
torch.distributed.rpc's. While it is entered, every request this worker handles (on any of its
RPC threads) runs under the legacy autograd profiler; on exit its ``function_events`` hold them
all, and ``process_global_function_events`` one list per handled request.

    with rpc._server_process_global_profile() as prof:
        ...  # other workers call this one
    print(prof.key_averages().table())

It can also be driven remotely, as in PyTorch:
``p = rpc.remote("worker1", rpc._server_process_global_profile)``,
``p.rpc_sync().__enter__()``, ..., ``p.rpc_sync().__exit__(None, None, None)``.
Entering nests: an outer profile also sees what an inner one saw.
"""
from __future__ import annotations

import itertools
from typing import Any, List

import torch
from torch.autograd.profiler_legacy import _parse_legacy_records, profile
from torch.autograd.profiler_util import EventList, FunctionEvent

from tether import _C

__all__: List[str] = []


def _enable_server_process_global_profiler(config: torch.autograd.ProfilerConfig) -> None:
    """Profiles every request this worker handles from now on, with ``config``."""
    _C.enable_server_process_global_profiler(config)


def _disable_server_process_global_profiler() -> List[Any]:
    """Stops the innermost enable; returns one event list (per thread) for each handled
    request. Raises if the server-process profiler is not on."""
    return _C.disable_server_process_global_profiler()


class _server_process_global_profile(profile):
    """``torch.autograd.profiler_legacy.profile`` for every RPC request-handling thread of this
    worker (see the module's doc)."""

    def __enter__(self):
        if not self.enabled:
            return self
        if self.entered:
            raise RuntimeError("autograd profiler traces are not reentrant")
        self.entered = True
        state = torch.autograd.ProfilerState.CUDA if self.use_cuda else torch.autograd.ProfilerState.CPU
        config = torch.autograd.ProfilerConfig(
            state, self.record_shapes, self.profile_memory, False, False, False,
            torch.profiler._ExperimentalConfig())
        _enable_server_process_global_profiler(config)
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        if not self.enabled:
            return False
        per_request: List[List[FunctionEvent]] = []
        for thread_lists in _disable_server_process_global_profiler():
            events = _parse_legacy_records(thread_lists)
            events.sort(key=lambda e: [e.time_range.start, -e.time_range.end])
            per_request.append(events)
        self.function_events = EventList(
            list(itertools.chain.from_iterable(per_request)), use_cuda=self.use_cuda,
            profile_memory=self.profile_memory)
        self.function_events._build_tree()
        self.process_global_function_events = per_request
        return False
