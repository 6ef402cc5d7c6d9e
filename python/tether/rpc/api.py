"""rpc_sync, rpc_async, remote, shutdown, WorkerInfo, RRef: torch.distributed.rpc's API over
Tether's engine."""
import asyncio
import atexit
import contextlib
import datetime
import functools
import logging
import re
import threading
import time
import weakref
from typing import Any, Dict, Generic, Optional, Set, TypeVar

import torch
import torch.jit._builtins

from tether import _C

from . import _profiling
from . import _shutdown
from . import internal
from .constants import DEFAULT_SHUTDOWN_TIMEOUT, UNSET_RPC_TIMEOUT
from .internal import PythonUDF, _internal_rpc_pickler

logger = logging.getLogger(__name__)

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
    global _self_info, _current_agent
    with _state_lock:
        _workers_by_name.clear()
        _workers_by_id.clear()
        _self_info = None
    if _current_agent is not None:
        _current_agent._state = "shut down"
        _current_agent = None


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
    Ctrl-C and which can be awaited in asyncio. A failed call completes it with an error of the
    future (as PyTorch's), so torch.futures.collect_all / wait_all fail at once."""

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
        _refuse_rrefs_for_script("rpc to a TorchScript function", args, kwargs)
        send = _C.remote_script if remote else _C.send_script
        return send(info.id, torch._jit_internal._qualified_name(func), args, kwargs, timeout,
                    profiling_key)
    pickler = _default_pickler
    if pickler is _internal_rpc_pickler:
        data, tensors = internal.serialize((func, args, kwargs), info.id)
    else:
        data, tensors = internal._serialize_with(pickler, PythonUDF(func, args, kwargs), info.id)
    send = _C.remote_python if remote else _C.send_python
    return send(info.id, data, tensors, timeout, async_exec, profiling_key)


def _holds_rref(value, depth=0) -> bool:
    if isinstance(value, _C.RRef):
        return True
    if depth < 4 and isinstance(value, (list, tuple)):
        return any(_holds_rref(v, depth + 1) for v in value)
    if depth < 4 and isinstance(value, dict):
        return any(_holds_rref(v, depth + 1) for v in value.values())
    return False


def _refuse_rrefs_for_script(what, args, kwargs) -> None:
    """TorchScript cannot hold Tether's RRefs: say so before sending, naming it."""
    if _holds_rref(args) or _holds_rref(kwargs):
        raise NotImplementedError(
            f"{what}: RRefs cannot be passed to TorchScript functions under Tether (TorchScript "
            "cannot hold Tether's RRefs); pass the value (rref.to_here()) or call a Python "
            "function"
        )


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

    # The value, or the very error (an error of the future, as the call's own future has it).
    source.add_done_callback(lambda src: _C.complete_future_like(out, src))
    return out


def _rpc_async(to, func, args, kwargs, timeout, profiling_key=""):
    fut = _future_of(_send(to, func, args, kwargs, timeout, profiling_key=profiling_key))
    if hasattr(_thread_local_var, "future_list"):
        _thread_local_var.future_list.append(fut)
    return fut


def _future_of(pending):
    """The _RpcFuture a sent call's result (a _C.Pending) is delivered to."""
    fut = _RpcFuture()
    fut._pending = pending
    pending.deliver_to(fut)
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
    (with the creation's error, an error of the future, if it failed), as torch.distributed.rpc's
    RRef._get_future(); done at once for an owner RRef (unlike PyTorch's, which waits for the
    owner's value)."""
    fut: torch.futures.Future = torch.futures.Future()

    def done(error):
        if error is None:
            fut.set_result(None)
        else:
            _C.set_future_error(fut, error)

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


def _failed(fut: torch.futures.Future) -> bool:
    try:
        fut.value()
    except Exception:  # noqa: B902
        return True
    return False


def _rref_get_type(self, timeout=UNSET_RPC_TIMEOUT, blocking=True):
    """The type of the value, as torch.distributed.rpc's RRef._get_type: on a user, asked of
    the owner once (an rpc_async of ``_rref_typeof_on_owner`` bounded by ``timeout``, which the
    profiler records) and remembered; ``blocking=False`` returns a Future of it (the same one
    every time). Unlike PyTorch, an ask that failed (a timeout, say) is not remembered: the next
    call asks again; and a blocking call followed by a non-blocking one still gets a Future."""
    fut = getattr(self, "_tether_type_future", None)
    if fut is not None and fut.done() and _failed(fut):
        # wait() can return before forget_failure below has run (torch runs done callbacks
        # after it wakes waiters), so a failure just seen is checked here too.
        fut = None
    if fut is None:
        if self.is_owner():
            fut = _rref_typeof_on_owner(self, blocking=False)
        else:
            fut = rpc_async(self.owner(), _rref_typeof_on_owner, args=(self,), timeout=timeout)
        self._tether_type_future = fut

        ref = weakref.ref(self)  # the future's callback must not keep the RRef alive

        def forget_failure(f):
            if _failed(f):
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


# --- The seed's private surface: the agent, its lifecycle, RRef context, invoke paths ---------------
# torch.distributed.rpc's private bindings and Python-layer helpers, with PyTorch's names and
# argument shapes, over Tether's engine (python/README.md lists what cannot apply).

_METRIC_KEYS = (
    "agent.client_active_calls", "agent.server_active_calls", "agent.server_active_async_calls",
    "agent.num_idle_threads", "agent.thread_pool_size", "agent.gil_average_wait_time_us",
)


def _shutdown_rpc(graceful=True, timeout=DEFAULT_SHUTDOWN_TIMEOUT):
    shutdown(graceful=graceful, timeout=timeout)  # the module's, looked up at call time


class _AgentView:
    """The agent of this process's run, as `rpc.api._get_current_rpc_agent()` returns it in
    PyTorch (a TensorPipeAgent there): made by `_init_rpc_backend`, started by
    `_set_and_start_rpc_agent`, current until shut down."""

    is_static_group = True  # world_size is required: groups are static

    def __init__(self, infos, rank):
        self._infos = list(infos)
        self._rank = rank
        self._state = "created"  # -> "running" -> "shut down"

    def _start(self):
        """The worker registry first, then the engine serves: a peer may call at once. On any
        error (Ctrl-C included) nothing is left half started."""
        if self._state != "created":
            raise RuntimeError(f"_set_and_start_rpc_agent: this agent is {self._state} already")
        global _current_agent
        try:
            _set_workers(self._infos, self._rank)
            _current_agent = self
            _C.start()
        except BaseException:
            _current_agent = None
            _clear_workers()
            _stop_now()
            self._state = "shut down"
            raise
        self._state = "running"

    def _running(self, what):
        if self._state != "running" or not _C.is_initialized():
            raise RuntimeError(f"{what}: the RPC agent is not running (state: {self._state})")

    def get_worker_info(self, worker_name=None):
        """This worker's WorkerInfo, or the one of `worker_name` (a name or an id)."""
        self._running("get_worker_info")
        return get_worker_info(worker_name)

    def get_worker_infos(self):
        """Every worker's WorkerInfo, by id."""
        self._running("get_worker_infos")
        return [_workers_by_id[i] for i in sorted(_workers_by_id)]

    def get_metrics(self):
        """PyTorch's agent metrics (values are strings): agent.client_active_calls,
        agent.server_active_calls, agent.server_active_async_calls, agent.num_idle_threads,
        agent.thread_pool_size, and agent.gil_average_wait_time_us while
        enable_gil_profiling(True)."""
        self._running("get_metrics")
        info = _get_debug_info_agent()
        return {k: info[k] for k in _METRIC_KEYS if k in info}

    def get_debug_info(self):
        """get_metrics() plus Tether's own counters (agent.calls_sent, ...)."""
        self._running("get_debug_info")
        return _get_debug_info_agent()

    def join(self, shutdown=False, timeout=0):
        """Blocks until every worker has called join() and no worker has a call of its own in
        flight (rounds of _all_gather of the workers' counts of calls in flight, as PyTorch's
        agent sums them through its store; ``timeout`` seconds bounds each round, 0: none).
        ``shutdown=True``: then shuts down gracefully, as rpc.shutdown() does."""
        self._running("join")
        if not shutdown:
            while sum(_all_gather(_calls_in_flight_when_idle(), timeout=timeout).values()):
                pass
            return
        _shutdown_rpc(graceful=True, timeout=timeout)  # the agent is the current one

    def sync(self):
        """Nothing to do: sends are never buffered (PyTorch's TensorPipe agent does nothing too)."""

    def shutdown(self):
        """Stops this worker's RPC at once (a local, ungraceful shutdown; nothing if it is not
        running)."""
        if self._state == "running" and _C.is_initialized():
            _shutdown_rpc(graceful=False)
        self._state = "shut down"

    def __repr__(self):
        return f"<tether.rpc agent of {self._infos_name()} ({self._state})>"

    def _infos_name(self):
        for name, wid in self._infos:
            if wid == self._rank:
                return name
        return f"rank {self._rank}"


def _calls_in_flight_when_idle() -> int:
    """Waits until this worker has no call of its own in flight, then returns how many it has
    (more than 0 if another thread made one meanwhile)."""
    while int(_C.agent_debug_info()["agent.client_active_calls"]) > 0:
        time.sleep(0.005)
    return int(_C.agent_debug_info()["agent.client_active_calls"])


_current_agent: Optional[_AgentView] = None


def _is_current_rpc_agent_set() -> bool:
    """Whether RPC runs in this process (init_rpc done, shutdown not yet)."""
    return _current_agent is not None and _C.is_initialized()


def _get_current_rpc_agent() -> _AgentView:
    agent = _current_agent
    if agent is None or not _C.is_initialized():
        raise RuntimeError(
            "Current RPC agent is not set! Did you initialize the RPC framework "
            "(e.g. by calling `rpc.init_rpc`)?"
        )
    return agent


def _set_and_start_rpc_agent(agent) -> None:
    """Makes `agent` (made by _init_rpc_backend) the current one and starts it."""
    if not isinstance(agent, _AgentView):
        raise TypeError(
            "_set_and_start_rpc_agent: Tether runs only its own agent (the one _init_rpc_backend "
            f"makes), got {type(agent).__name__}"
        )
    if _is_current_rpc_agent_set():
        raise RuntimeError("_set_and_start_rpc_agent: Current RPC agent is already set")
    agent._start()


def _reset_current_rpc_agent() -> None:
    """Forgets the current agent once it is shut down (PyTorch's last step of shutdown()).
    Tether's agent cannot run without being current: while it runs this fails, naming it."""
    global _current_agent
    if _C.is_initialized():
        raise RuntimeError(
            "_reset_current_rpc_agent: Tether's RPC agent stays current while it runs; shut it "
            "down first (rpc.shutdown() or _get_current_rpc_agent().shutdown())"
        )
    _current_agent = None


def _cleanup_python_rpc_handler() -> None:
    """Nothing to do: Tether keeps no per-run Python handler state (its hooks into tether.rpc
    are installed once, at import), so a later init_rpc works as before."""


def _timeout_seconds(timeout) -> float:
    if isinstance(timeout, datetime.timedelta):
        return timeout.total_seconds()
    return float(timeout)


@_require_initialized
def _delete_all_user_and_unforked_owner_rrefs(timeout=datetime.timedelta(seconds=100)) -> None:
    """Deletes every user RRef of this worker (they can no longer be used) and every owner RRef
    nobody else knows of, and waits until the owners acknowledged the deletions, at most
    ``timeout`` (a timedelta or seconds; 0: no bound). Part of a graceful shutdown, as in
    PyTorch."""
    _C.delete_all_user_and_unforked_owner_rrefs(_timeout_seconds(timeout))


def _destroy_rref_context(ignore_leak: bool) -> None:
    """Closes this worker's RRef context: RRefs dropped from now on send nothing and RRef
    messages from other workers are refused. Unless ``ignore_leak``, fails (tether._C.RRefLeakError,
    a RuntimeError, "Leaking RRef(s) ...") listing the references still alive. Nothing to do once
    RPC is shut down (the context went with it)."""
    if _C.is_initialized():
        _C.destroy_rref_context(bool(ignore_leak))


def _set_profiler_node_id(node_id: int) -> None:
    """The node id profiler events recorded here carry (init_rpc sets the worker's id)."""
    _C.set_profiler_node_id(int(node_id))


def _enable_jit_rref_pickle() -> None:
    """Would let torch.jit.save pickle RRefs held by a ScriptModule. Tether's RRefs cannot be
    held by TorchScript (RRefs passed to or returned from TorchScript functions, RRef attributes of
    ScriptModules): refused, naming it."""
    raise NotImplementedError(
        "_enable_jit_rref_pickle: Tether's RRefs cannot be used from TorchScript (passed to or "
        "returned from TorchScript functions, or held by a ScriptModule), so there are no RRefs "
        "for torch.jit.save to pickle"
    )


def _disable_jit_rref_pickle() -> None:
    """Nothing to do: RRef pickling by TorchScript is never enabled under Tether."""


def _worker_info_arg(what, dst) -> WorkerInfo:
    if isinstance(dst, WorkerInfo):
        return dst
    if isinstance(dst, (str, int)) and not isinstance(dst, bool):
        return get_worker_info(dst)
    raise TypeError(f"{what}: the destination must be a WorkerInfo, a name or an id, got {dst!r}")


def _check_script_async(what, is_async_exec):
    if is_async_exec:
        raise NotImplementedError(
            f"{what}: @rpc.functions.async_execution on TorchScript functions is not supported "
            "by Tether"
        )


@_require_initialized
def _invoke_rpc_builtin(dst_worker_info, qualified_name, rpc_timeout, *args, **kwargs):
    """Runs the builtin operator `qualified_name` (``aten::add``) on the destination; a Future."""
    info = _worker_info_arg("_invoke_rpc_builtin", dst_worker_info)
    return _future_of(_C.send_builtin(info.id, qualified_name, args, kwargs,
                                      _timeout_arg(rpc_timeout), ""))


@_require_initialized
def _invoke_rpc_python_udf(dst_worker_info, pickled_python_udf, tensors, rpc_timeout,
                           is_async_exec):
    """Sends a Python call pickled by a pickler's serialize(PythonUDF(func, args, kwargs)); a
    Future."""
    info = _worker_info_arg("_invoke_rpc_python_udf", dst_worker_info)
    return _future_of(_C.send_python(info.id, bytes(pickled_python_udf), list(tensors),
                                     _timeout_arg(rpc_timeout), bool(is_async_exec), ""))


@_require_initialized
def _invoke_rpc_torchscript(dst_worker_name, qualified_name_str, args, kwargs, rpc_timeout,
                            is_async_exec):
    """Runs the TorchScript function `qualified_name_str` on the destination; a Future."""
    _check_script_async("_invoke_rpc_torchscript", is_async_exec)
    _refuse_rrefs_for_script("_invoke_rpc_torchscript", args, kwargs)
    info = _worker_info_arg("_invoke_rpc_torchscript", dst_worker_name)
    return _future_of(_C.send_script(info.id, qualified_name_str, tuple(args or ()),
                                     dict(kwargs or {}), _timeout_arg(rpc_timeout), ""))


@_require_initialized
def _invoke_remote_builtin(dst_worker_info, qualified_name, rpc_timeout, *args, **kwargs):
    """remote() of a builtin operator: an RRef owned by the destination."""
    info = _worker_info_arg("_invoke_remote_builtin", dst_worker_info)
    return _C.remote_builtin(info.id, qualified_name, args, kwargs, _timeout_arg(rpc_timeout), "")


@_require_initialized
def _invoke_remote_python_udf(dst_worker_info, pickled_python_udf, tensors, rpc_timeout,
                              is_async_exec):
    """remote() of a pickled Python call: an RRef owned by the destination."""
    info = _worker_info_arg("_invoke_remote_python_udf", dst_worker_info)
    return _C.remote_python(info.id, bytes(pickled_python_udf), list(tensors),
                            _timeout_arg(rpc_timeout), bool(is_async_exec), "")


@_require_initialized
def _invoke_remote_torchscript(dst_worker_name, qualified_name_str, rpc_timeout, is_async_exec,
                               *args, **kwargs):
    """remote() of a TorchScript function: an RRef owned by the destination."""
    _check_script_async("_invoke_remote_torchscript", is_async_exec)
    _refuse_rrefs_for_script("_invoke_remote_torchscript", args, kwargs)
    info = _worker_info_arg("_invoke_remote_torchscript", dst_worker_name)
    return _C.remote_script(info.id, qualified_name_str, args, kwargs, _timeout_arg(rpc_timeout),
                            "")


# --- The pickler of Python calls ----------------------------------------------------------------
_default_pickler = _internal_rpc_pickler


@contextlib.contextmanager
def _use_rpc_pickler(rpc_pickler):
    """Within the context, Python calls (rpc_sync, rpc_async, remote) are pickled with
    ``rpc_pickler.serialize(PythonUDF(func, args, kwargs))`` (a process-wide switch, as in
    PyTorch); afterwards with the default one again."""
    global _default_pickler
    _default_pickler = rpc_pickler
    try:
        yield
    finally:
        _default_pickler = _internal_rpc_pickler


# --- _all_gather, _barrier, _wait_all_workers ---------------------------------------------------
# A gather through the leader (the first worker name in sorted order): every worker sends its
# object to the leader, which, once it has every worker's, sends the whole map back to each.

class AllGatherStates:
    def __init__(self):
        self.gathered_objects: Dict[str, Any] = {}
        self.proceed_signal = threading.Event()


_ALL_WORKER_NAMES: Set[str] = set()
_all_gather_dict_lock = threading.RLock()
_all_gather_sequence_id: Dict[str, int] = {}
_all_gather_sequence_id_to_states: Dict[str, AllGatherStates] = {}


def _gather_states(sequence_id) -> AllGatherStates:
    with _all_gather_dict_lock:
        states = _all_gather_sequence_id_to_states.get(sequence_id)
        if states is None:
            states = _all_gather_sequence_id_to_states[sequence_id] = AllGatherStates()
        return states


def _init_rpc_states(agent) -> None:
    """Records the workers' names for _all_gather and starts `agent` unless it runs already."""
    global _ALL_WORKER_NAMES
    _ALL_WORKER_NAMES = {name for name, _ in agent._infos}
    if not _is_current_rpc_agent_set():
        _set_and_start_rpc_agent(agent)


def _gather_to_leader(sequence_id, worker_name, obj, worker_names=None):
    """On the leader: `worker_name`'s object for gather `sequence_id`."""
    with _all_gather_dict_lock:
        if not worker_names:
            worker_names = _ALL_WORKER_NAMES
            assert worker_name in worker_names, f"{worker_name} is not expected by leader."
        states = _gather_states(sequence_id)
        assert worker_name not in states.gathered_objects, (
            f"{worker_name} reported intent sequence id {sequence_id} twice. "
        )
        states.gathered_objects[worker_name] = obj
        if set(worker_names) == set(states.gathered_objects):
            states.proceed_signal.set()


def _broadcast_to_followers(sequence_id, objects_map):
    """On a follower: the leader's map of every worker's object for gather `sequence_id`."""
    states = _gather_states(sequence_id)
    assert not states.proceed_signal.is_set(), (
        f"Termination signal sequence id {sequence_id} got set twice."
    )
    states.gathered_objects = objects_map
    states.proceed_signal.set()


@_require_initialized
def _all_gather(obj, worker_names=None, timeout=UNSET_RPC_TIMEOUT):
    """Every worker of `worker_names` (default: all) calls it with its `obj`; each gets the map
    {worker name: obj} once the leader has them all. ``timeout``: -1 uses the RPC timeout for the
    calls and waits for the others without bound; 0 bounds nothing; else bounds both. Raises
    RuntimeError on the leader naming the followers it could not reach."""
    if not worker_names:
        worker_names = _ALL_WORKER_NAMES
    worker_names = set(worker_names)
    leader_name = sorted(worker_names)[0]
    self_name = _self_info.name
    concat_names = "".join(sorted(worker_names))
    with _all_gather_dict_lock:
        sequence_num = _all_gather_sequence_id.get(concat_names, 0)
        _all_gather_sequence_id[concat_names] = sequence_num + 1
    sequence_id = concat_names + str(sequence_num)
    is_leader = leader_name == self_name

    if timeout == UNSET_RPC_TIMEOUT:
        rpc_timeout, signal_timeout = get_rpc_timeout(), None
    elif timeout == DEFAULT_SHUTDOWN_TIMEOUT:
        rpc_timeout, signal_timeout = timeout, None
    else:
        rpc_timeout = signal_timeout = timeout

    if is_leader:
        _gather_to_leader(sequence_id, self_name, obj, worker_names)
    else:
        rpc_sync(leader_name, _gather_to_leader,
                 args=(sequence_id, self_name, obj, worker_names), timeout=rpc_timeout)

    states = _gather_states(sequence_id)
    # As in PyTorch, a leader whose wait timed out goes on with what it has (the followers'
    # broadcasts then say who is missing).
    states.proceed_signal.wait(timeout=signal_timeout)

    if is_leader:
        futs = {
            name: rpc_async(name, _broadcast_to_followers,
                            args=(sequence_id, states.gathered_objects), timeout=rpc_timeout)
            for name in sorted(worker_names - {leader_name})
        }
        errors = []
        for name, fut in futs.items():
            try:
                fut.wait()
            except RuntimeError as ex:
                errors.append((name, ex))
        if errors:
            raise RuntimeError(
                f"Followers {[e[0] for e in errors]} timed out in _all_gather "
                f"after {rpc_timeout:.2f} seconds. The first exception is {errors[0][1]}"
            )

    with _all_gather_dict_lock:
        states = _all_gather_sequence_id_to_states.pop(sequence_id)
    return states.gathered_objects


@_require_initialized
def _barrier(worker_names):
    """Blocks until every worker of `worker_names` has called _barrier(worker_names). A failure
    is logged, not raised (as in PyTorch)."""
    try:
        _all_gather(None, set(worker_names))
    except RuntimeError as ex:
        logger.error(f"Failed to complete barrier, got error {ex}")


@_require_initialized
def _wait_all_workers(timeout=DEFAULT_SHUTDOWN_TIMEOUT):
    """Blocks until every worker has called _wait_all_workers() (an _all_gather; ``timeout``
    seconds, 0: none). rpc.shutdown() does not need it: its barrier is the agent's."""
    try:
        _all_gather(None, timeout=timeout)
    except RuntimeError as ex:
        logger.error(f"Failed to respond to 'Shutdown Proceed' in time, got error {ex}")
        raise ex


@_require_initialized
def _worker_summary() -> str:
    """A one-screen summary of this live worker: counters, traffic per peer (calls, messages,
    bytes), and the oldest calls still in flight with their age."""
    return _C.agent_summary()
