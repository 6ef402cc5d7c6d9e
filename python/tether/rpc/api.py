"""rpc_sync, rpc_async, remote, shutdown, WorkerInfo, RRef: torch.distributed.rpc's API over
Tether's engine."""
import asyncio
import atexit
import functools
import re
import threading
import weakref
from typing import Dict, Generic, Optional, TypeVar

import torch
import torch.jit._builtins

from tether import _C

from . import _profiling
from . import _shutdown
from . import internal
from .constants import DEFAULT_SHUTDOWN_TIMEOUT, UNSET_RPC_TIMEOUT

__all__ = [
    "shutdown", "get_worker_info", "remote", "rpc_sync", "rpc_async", "RRef", "WorkerInfo",
    "RpcTimeoutError", "get_rpc_timeout", "_set_rpc_timeout", "enable_gil_profiling",
]

T = TypeVar("T")


class RpcTimeoutError(TimeoutError, RuntimeError):
    """An RPC that ran for more than its timeout. Both a TimeoutError and a RuntimeError (what
    code written for torch.distributed.rpc catches)."""


_C._set_hooks(internal._run_python_call, internal._decode_reply, internal._serialize_value,
              RpcTimeoutError)

_NAME_RE = re.compile(r"^[A-Za-z0-9_:\-]*$")
_MAX_NAME_LEN = 128


class WorkerInfo:
    """The name and id of a worker. Get one with get_worker_info() and pass it as `to` to avoid
    looking the name up on every call."""

    __slots__ = ("_name", "_id")

    def __init__(self, name: str, id: int):
        if not isinstance(name, str):
            raise TypeError(f"worker name must be a str, got {type(name)}")
        if not name:
            raise RuntimeError("Worker name must be non-empty")
        if len(name) >= _MAX_NAME_LEN:
            raise RuntimeError(f"Worker name must be shorter than {_MAX_NAME_LEN} chars, got {name}")
        if not _NAME_RE.match(name):
            raise RuntimeError(f"Worker name must match ^[A-Za-z0-9-_:]*$, but got {name}")
        self._name = name
        self._id = int(id)

    @property
    def name(self) -> str:
        return self._name

    @property
    def id(self) -> int:
        return self._id

    def __eq__(self, other):
        return isinstance(other, WorkerInfo) and (self._name, self._id) == (other._name, other._id)

    def __hash__(self):
        return hash((self._name, self._id))

    def __repr__(self):
        return f"WorkerInfo(id={self._id}, name={self._name})"

    def __reduce__(self):
        return (WorkerInfo, (self._name, self._id))


# Worker registry of the current run (filled by init_rpc).
_state_lock = threading.Lock()
_workers_by_name: Dict[str, WorkerInfo] = {}
_workers_by_id: Dict[int, WorkerInfo] = {}
_self_info: Optional[WorkerInfo] = None


def _set_workers(workers, self_id):
    global _self_info
    with _state_lock:
        _workers_by_name.clear()
        _workers_by_id.clear()
        for name, wid in workers:
            info = WorkerInfo(name, wid)
            _workers_by_name[name] = info
            _workers_by_id[wid] = info
        _self_info = _workers_by_id[self_id]


def _clear_workers():
    global _self_info
    with _state_lock:
        _workers_by_name.clear()
        _workers_by_id.clear()
        _self_info = None


def _require_initialized(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        if not _C.is_initialized():
            raise RuntimeError(
                "RPC has not been initialized. Call tether.rpc.init_rpc first."
            )
        return func(*args, **kwargs)

    return wrapper


@_require_initialized
def get_worker_info(worker_name=None) -> WorkerInfo:
    """The WorkerInfo of `worker_name` (a name or an id), or of this worker if None."""
    if worker_name is None:
        return _self_info
    if isinstance(worker_name, int):
        info = _workers_by_id.get(worker_name)
        kind = "id"
    else:
        info = _workers_by_name.get(worker_name)
        kind = "name"
    if info is None:
        me = _self_info
        raise RuntimeError(
            f"name:{me.name},rank:{me.id} could not find destination {kind} {worker_name}"
        )
    return info


def _to_worker_info(to) -> WorkerInfo:
    if isinstance(to, WorkerInfo):
        return to
    if isinstance(to, (str, int)) and not isinstance(to, bool):
        return get_worker_info(to)
    raise ValueError("Cannot get WorkerInfo from name {}".format(to))


@_require_initialized
def get_rpc_timeout() -> float:
    """The default RPC timeout in seconds (0: none)."""
    return _C.get_rpc_timeout()


@_require_initialized
def _set_rpc_timeout(rpc_timeout: float) -> None:
    """Sets the default timeout of calls made from now on (seconds; 0: none)."""
    _C.set_rpc_timeout(float(rpc_timeout))


def enable_gil_profiling(flag: bool) -> None:
    """Records how long RPC threads wait for the GIL; reported as
    'agent.gil_average_wait_time_us' in the debug info."""
    _C.enable_gil_profiling(bool(flag))


class _RpcFuture(torch.futures.Future):
    """The Future of rpc_async: a torch.futures.Future whose wait() can be interrupted with
    Ctrl-C and which can be awaited in asyncio."""

    def wait(self):
        pending = getattr(self, "_pending", None)
        if pending is not None and not self.done():
            # Delivers the reply here if the delivery queue has not yet (it may be held up by
            # a blocked done-callback of another future, or stopped by a shutdown). A future
            # made by _follow() is completed by the callbacks that delivery runs.
            pending.deliver_now()
        return super().wait()

    def __await__(self):
        loop = asyncio.get_event_loop()
        result = loop.create_future()

        def transfer(fut):
            if result.cancelled():
                return
            try:
                result.set_result(fut.value())
            except BaseException as e:  # noqa: B902 (delivered to the awaiting coroutine)
                result.set_exception(e)

        self.add_done_callback(lambda fut: loop.call_soon_threadsafe(transfer, fut))
        return result.__await__()


def _timeout_arg(timeout):
    if timeout is None:
        return UNSET_RPC_TIMEOUT
    timeout = float(timeout)
    if timeout < 0 and timeout != UNSET_RPC_TIMEOUT:
        raise ValueError(f"timeout must be >= 0 (or -1 for the default), got {timeout}")
    return timeout


def _send(to, func, args, kwargs, timeout, remote=False, profiling_key=""):
    if not callable(func):
        raise TypeError("function should be callable.")
    info = _workers_by_name.get(to) if type(to) is str else None
    if info is None:
        if not _C.is_initialized():
            raise RuntimeError("RPC has not been initialized. Call tether.rpc.init_rpc first.")
        info = _to_worker_info(to)
    args = tuple(args) if args else ()
    kwargs = dict(kwargs) if kwargs else {}
    if timeout != UNSET_RPC_TIMEOUT:
        timeout = _timeout_arg(timeout)
    async_exec = hasattr(func, "_wrapped_async_rpc_function")
    if async_exec and isinstance(func._wrapped_async_rpc_function, torch.jit.ScriptFunction):
        raise NotImplementedError(
            "@rpc.functions.async_execution on TorchScript functions is not supported by Tether"
        )
    qualified_name = torch.jit._builtins._find_builtin(func)
    if qualified_name is not None:
        send = _C.remote_builtin if remote else _C.send_builtin
        return send(info.id, qualified_name, args, kwargs, timeout, profiling_key)
    if isinstance(func, torch.jit.ScriptFunction):
        send = _C.remote_script if remote else _C.send_script
        return send(info.id, torch._jit_internal._qualified_name(func), args, kwargs, timeout,
                    profiling_key)
    data, tensors = internal.serialize((func, args, kwargs), info.id)
    send = _C.remote_python if remote else _C.send_python
    return send(info.id, data, tensors, timeout, async_exec, profiling_key)


def _profiling_key(rpc_type, func, to):
    if not _profiling.should_profile():
        return None
    if not _C.is_initialized():
        return None  # _send raises the clear error
    return _profiling.call_key(rpc_type, func, _self_info.name, _to_worker_info(to).name)


def rpc_sync(to, func, args=None, kwargs=None, timeout=UNSET_RPC_TIMEOUT):
    """Runs ``func(*args, **kwargs)`` on worker ``to`` (a name, id or WorkerInfo) and returns
    its result. ``timeout`` in seconds: -1 uses the default, 0 means none."""
    key = _profiling_key("sync", func, to)
    if key is not None:
        with _profiling.record(key):
            return _send(to, func, args, kwargs, timeout, profiling_key=key).wait()
    return _send(to, func, args, kwargs, timeout).wait()


def rpc_async(to, func, args=None, kwargs=None, timeout=UNSET_RPC_TIMEOUT):
    """Like rpc_sync, but returns at once a torch.futures.Future of the result."""
    key = _profiling_key("async", func, to)
    if key is not None:
        with _profiling.record(key) as rf:
            fut = _rpc_async(to, func, args, kwargs, timeout, profiling_key=key)
            # The event ends when the result arrives; wait() on the returned future sees it.
            return _follow(rf._call_end_callbacks_on_future(fut), fut._pending)
    return _rpc_async(to, func, args, kwargs, timeout)


def _follow(source, pending):
    """An _RpcFuture completed as `source` (a torch future chained to an rpc_async future) is:
    its wait() delivers the call's result itself if need be, as the rpc_async future's does."""
    out = _RpcFuture()
    out._pending = pending

    def transfer(src):
        try:
            out.set_result(src.value())
        except Exception as e:  # noqa: B902 (the call's error, delivered to the waiter)
            out.set_exception(e)

    source.add_done_callback(transfer)
    return out


def _rpc_async(to, func, args, kwargs, timeout, profiling_key=""):
    pending = _send(to, func, args, kwargs, timeout, profiling_key=profiling_key)
    fut = _RpcFuture()
    fut._pending = pending
    pending.deliver_to(fut)
    if hasattr(_thread_local_var, "future_list"):
        _thread_local_var.future_list.append(fut)
    return fut


def remote(to, func, args=None, kwargs=None, timeout=UNSET_RPC_TIMEOUT):
    """Runs ``func(*args, **kwargs)`` on worker ``to`` and returns at once an RRef to the result,
    owned by ``to``."""
    key = _profiling_key("remote", func, to)
    if key is not None:
        # The event spans the call's send; the owner's operators join the profile when its
        # creation reply arrives, which to_here() and rref._get_future() wait for.
        with _profiling.record(key):
            rref = _send(to, func, args, kwargs, timeout, remote=True, profiling_key=key)
        rref._set_profiling_future(rref._get_future())
        return rref
    return _send(to, func, args, kwargs, timeout, remote=True)


_thread_local_var = threading.local()


class _WaitAll:
    def __enter__(self):
        _thread_local_var.future_list = []

    def __exit__(self, *exc):
        try:
            torch.futures.wait_all(_thread_local_var.future_list)
        finally:
            del _thread_local_var.future_list


def _wait_all():
    """Context manager that waits for every rpc_async future created inside it."""
    return _WaitAll()


def _stop_now():
    """Stops this worker's RPC at once (ungracefully) if it runs; never raises (the caller has
    the error that matters)."""
    if _C.is_initialized():
        try:
            _C.shutdown(False, 0.0)
        except BaseException:  # noqa: B902
            pass


@_require_initialized
def shutdown(graceful=True, timeout=DEFAULT_SHUTDOWN_TIMEOUT):
    """Shuts down RPC. Graceful (default): waits until every worker has called shutdown(), then
    deletes this worker's user RRefs and waits until no work is left anywhere (everything
    bounded by ``timeout`` seconds if > 0; core/agent.h's barrier), reporting every few seconds
    what it waits for (_shutdown.py). Fails at once, naming it, if a worker is gone before every
    worker called shutdown(). Otherwise stops at once; pending calls fail."""
    try:
        on_wait = _shutdown.reporter(_self_info) if graceful else None
        try:
            _C.shutdown(bool(graceful), float(timeout), on_wait)
        except BaseException:
            # Ctrl-C (or anything else) in the middle of the barrier: RPC is not left half shut
            # down (as PyTorch finalizes its shutdown in every case).
            _stop_now()
            raise
    finally:
        # A handler stuck in user code does not hold the stop up for more than a bound (the
        # runtime leaves its thread behind); say which ones.
        _shutdown.report_left_behind()
        _clear_workers()
        from . import _release_store

        _release_store()


@atexit.register
def _shutdown_at_exit():
    if _C.is_initialized():
        try:
            _C.shutdown(False, 0.0)
        except Exception:
            pass
        _shutdown.report_left_behind()


# --- RRef -----------------------------------------------------------------------------------
RRef = _C.RRef


def _rref_get_future(self) -> torch.futures.Future:
    """A future completed when the owner has acknowledged creating this user RRef's value
    (set_exception with the creation's error if it failed), as torch.distributed.rpc's
    RRef._get_future(); done at once for an owner RRef (unlike PyTorch's, which waits for the
    owner's value)."""
    fut: torch.futures.Future = torch.futures.Future()

    def done(error):
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)

    _C.on_confirmed([self], done)
    return fut


RRef._get_future = _rref_get_future


def _rref_typeof_on_owner(rref, blocking=True):
    """The type of the value (on its owner); a completed Future of it if not `blocking`."""
    rref_type = type(rref.local_value())
    if blocking:
        return rref_type
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(rref_type)
    return fut


def _rref_get_type(self, timeout=UNSET_RPC_TIMEOUT, blocking=True):
    """The type of the value, as torch.distributed.rpc's RRef._get_type: on a user, asked of
    the owner once (an rpc_async of ``_rref_typeof_on_owner`` bounded by ``timeout``, which the
    profiler records) and remembered; ``blocking=False`` returns a Future of it (the same one
    every time). Unlike PyTorch, an ask that failed (a timeout, say) is not remembered: the next
    call asks again; and a blocking call followed by a non-blocking one still gets a Future."""
    fut = getattr(self, "_tether_type_future", None)
    if fut is None:
        if self.is_owner():
            fut = _rref_typeof_on_owner(self, blocking=False)
        else:
            fut = rpc_async(self.owner(), _rref_typeof_on_owner, args=(self,), timeout=timeout)
        self._tether_type_future = fut

        ref = weakref.ref(self)  # the future's callback must not keep the RRef alive

        def forget_failure(f):
            try:
                f.value()
            except Exception:  # noqa: B902 (the ask failed: forget it)
                rref = ref()
                if rref is not None and getattr(rref, "_tether_type_future", None) is f:
                    rref._tether_type_future = None

        fut.add_done_callback(forget_failure)
    return fut.wait() if blocking else fut


def _rref_get_profiling_future(self) -> torch.futures.Future:
    """The future _set_profiling_future() set (for a remote() made under the profiler: done once
    the owner's creation reply, with its profiled events, was processed)."""
    fut = getattr(self, "_tether_profiling_future", None)
    if fut is None:
        raise RuntimeError("Profiling future has not been set!")
    return fut


def _rref_set_profiling_future(self, profiling_future: torch.futures.Future) -> None:
    if not isinstance(profiling_future, torch._C.Future):
        raise TypeError(
            f"_set_profiling_future expects a torch.futures.Future, got {type(profiling_future)}"
        )
    self._tether_profiling_future = profiling_future


RRef._get_type = _rref_get_type
RRef._get_profiling_future = _rref_get_profiling_future
RRef._set_profiling_future = _rref_set_profiling_future
RRef._serialize = lambda self: internal._serialize_rref(self)
RRef._serialize.__doc__ = internal._serialize_rref.__doc__
RRef._deserialize = staticmethod(internal._deserialize_rref)


def _rref_owner(self) -> WorkerInfo:
    """The WorkerInfo of the owner."""
    return get_worker_info(self._owner_id())


def _rref_reduce(self):
    raise RuntimeError(
        "Can not pickle rref in python pickler, rref can only be pickled when using RPC"
    )


def _rref_proxy(api_name):
    def make(self, timeout=UNSET_RPC_TIMEOUT):
        from .rref_proxy import RRefProxy

        return RRefProxy(self, api_name, timeout)

    make.__name__ = api_name
    make.__doc__ = (
        f"A proxy that runs methods of the value on its owner with {api_name}: "
        f"``rref.{api_name}().method(*args)``."
    )
    return make


def _rref_backward(self, dist_autograd_ctx_id: int = -1, retain_graph: bool = False) -> None:
    """Runs a backward pass from this RRef's value, a scalar tensor, on its owner: local autograd
    with ``dist_autograd_ctx_id=-1`` (owner RRefs only), else a distributed pass of that context
    started on the owner. Blocks until it is done."""
    if self.is_owner():
        value = self.local_value()
        if not isinstance(value, torch.Tensor):
            raise RuntimeError("RRef should contain a tensor for .backward()")
        if dist_autograd_ctx_id == -1:
            torch.autograd.backward(value)
        else:
            _C.autograd_backward(dist_autograd_ctx_id, [value], retain_graph)
        return
    if dist_autograd_ctx_id == -1:
        raise RuntimeError("User RRefs require 'dist_autograd_ctx_id' to be specified")
    rpc_sync(self.owner(), _rref_backward_on_owner, args=(self, dist_autograd_ctx_id, retain_graph))


def _rref_backward_on_owner(rref, dist_autograd_ctx_id: int, retain_graph: bool) -> None:
    rref.backward(dist_autograd_ctx_id, retain_graph)


RRef.backward = _rref_backward
RRef.owner = _rref_owner
RRef.__reduce__ = _rref_reduce
RRef.__reduce_ex__ = lambda self, protocol: _rref_reduce(self)
RRef.rpc_sync = _rref_proxy("rpc_sync")
RRef.rpc_async = _rref_proxy("rpc_async")
RRef.remote = _rref_proxy("remote")
RRef.__class_getitem__ = classmethod(lambda cls, item: cls)


def _get_debug_info_agent():
    """Agent counters with PyTorch's keys (agent.client_active_calls, agent.server_active_calls,
    agent.server_active_async_calls, agent.thread_pool_size, agent.gil_average_wait_time_us when
    GIL profiling is on) plus Tether's own (agent.calls_sent, ...). Values are strings."""
    return _C.agent_debug_info()


class _AgentView:
    """What `rpc.api._get_current_rpc_agent()` offers in PyTorch, for code that inspects it."""

    def get_worker_info(self, worker_name=None):
        return get_worker_info(worker_name)

    def get_worker_infos(self):
        return [_workers_by_id[i] for i in sorted(_workers_by_id)]

    def get_debug_info(self):
        return _get_debug_info_agent()


def _get_current_rpc_agent():
    if not _C.is_initialized():
        raise RuntimeError(
            "Current RPC agent is not set! Did you initialize the RPC framework (init_rpc)?"
        )
    return _AgentView()


@_require_initialized
def _worker_summary() -> str:
    """A one-screen summary of this live worker: counters, traffic per peer (calls, messages,
    bytes), and the oldest calls still in flight with their age."""
    return _C.agent_summary()
