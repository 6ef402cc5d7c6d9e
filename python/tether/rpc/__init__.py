"""tether.rpc: a drop-in replacement for torch.distributed.rpc.

    import tether.rpc as rpc          # instead of: import torch.distributed.rpc as rpc
    rpc.init_rpc("worker0", rank=0, world_size=2)
    rpc.rpc_sync("worker1", torch.add, args=(torch.ones(2), 1))
    rpc.shutdown()

The rendezvous is torch.distributed's (init_method tcp://, file://, env://), as in PyTorch; the
RPC engine is Tether's (tether._C).
"""
import ipaddress
import numbers
import os
import threading
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from tether import _C

from . import api, backend_registry, constants, functions, internal  # noqa: F401
from .api import (  # noqa: F401
    RRef,
    RpcTimeoutError,
    WorkerInfo,
    _cleanup_python_rpc_handler,
    _delete_all_user_and_unforked_owner_rrefs,
    _destroy_rref_context,
    _disable_jit_rref_pickle,
    _enable_jit_rref_pickle,
    _get_current_rpc_agent,
    _get_debug_info_agent,
    _invoke_remote_builtin,
    _invoke_remote_python_udf,
    _invoke_remote_torchscript,
    _invoke_rpc_builtin,
    _invoke_rpc_python_udf,
    _invoke_rpc_torchscript,
    _is_current_rpc_agent_set,
    _require_initialized,
    _reset_current_rpc_agent,
    _set_and_start_rpc_agent,
    _set_profiler_node_id,
    _set_rpc_timeout,
    _wait_all,
    _worker_summary,
    enable_gil_profiling,
    get_rpc_timeout,
    get_worker_info,
    remote,
    rpc_async,
    rpc_sync,
    shutdown,
)
# The type of the agent _get_current_rpc_agent() returns (PyTorch's is a TensorPipeAgent).
TensorPipeAgent = api._AgentView
from .server_process_global_profiler import (  # noqa: F401
    _disable_server_process_global_profiler,
    _enable_server_process_global_profiler,
    _server_process_global_profile,
)
from .options import RpcBackendOptions, TensorPipeRpcBackendOptions, TetherRpcBackendOptions

__all__ = [
    "init_rpc", "shutdown", "rpc_sync", "rpc_async", "remote", "get_worker_info", "RRef",
    "WorkerInfo", "BackendType", "RpcBackendOptions", "TensorPipeRpcBackendOptions",
    "TetherRpcBackendOptions", "RpcTimeoutError", "get_rpc_timeout", "enable_gil_profiling",
    "functions", "is_available",
]

_init_counter = 0
_init_lock = threading.Lock()
_store = None  # Kept alive while RPC runs (rank 0 may host the TCPStore server).


def is_available():
    return True


def _release_store():
    global _store
    _store = None


def _store_host(init_method):
    """The rendezvous store's host, for choosing the address to publish ("" for file://)."""
    url = urlparse(init_method)
    if url.scheme == "tcp":
        return url.hostname or ""
    if url.scheme == "env":
        return os.environ.get("MASTER_ADDR", "127.0.0.1")
    return ""


def _publish_address(init_method, options):
    """The address this worker listens on and publishes (transport/rendezvous.h chooses it, as
    for a C++ worker): the ``interface`` option (an address, or a network interface's name),
    else $TETHER_SOCKET_IFNAME, else loopback if the store's host is loopback, the local address
    that reaches it otherwise, and loopback for file:// (multi-host file:// runs set the
    interface)."""
    interface = getattr(options, "interface", None) or ""
    address = ""
    if interface:
        try:
            ipaddress.ip_address(interface)
            address, interface = interface, ""
        except ValueError:
            pass
    return _C.choose_publish_address(interface, address, _store_host(init_method))


def init_rpc(name, backend=None, rank=-1, world_size=None, rpc_backend_options=None):
    r"""Starts RPC on this process, as torch.distributed.rpc.init_rpc does: a rendezvous through
    the c10d store named by ``rpc_backend_options.init_method`` (default ``env://``), after which
    every worker can call every other.

    Args:
        name (str): this worker's unique name (letters, digits, ``_``, ``:``, ``-``; < 128).
        backend (BackendType, optional): ``BackendType.TENSORPIPE`` (the default) or, once
            ``tether.rpc._testing`` is imported, ``FAULTY_TENSORPIPE``; both are Tether's
            engine. Inferred from ``rpc_backend_options`` when not given, as in PyTorch.
        rank (int): this worker's unique id in ``[0, world_size)``.
        world_size (int): number of workers. Required (dynamic groups are not supported).
        rpc_backend_options: a TensorPipeRpcBackendOptions, TetherRpcBackendOptions or
            FaultyTensorPipeRpcBackendOptions.
    """
    if backend is not None:
        current = backend_registry._current(backend)
        if current is None:
            raise TypeError("Argument backend must be a member of BackendType")
        backend = current
    if rpc_backend_options is not None and not isinstance(rpc_backend_options, RpcBackendOptions):
        raise TypeError("Argument rpc_backend_options must be an instance of RpcBackendOptions")
    if backend is None and rpc_backend_options is not None:
        backend = _infer_backend(rpc_backend_options)
    if backend is None:
        backend = backend_registry.BackendType.TENSORPIPE
    if rpc_backend_options is None:
        rpc_backend_options = backend_registry.construct_rpc_backend_options(backend)
    if not isinstance(name, str):
        raise RuntimeError(f"Argument {name} must be of type {str} but got type {type(name)}")
    WorkerInfo(name, 0)  # Validates the name.
    if world_size is None:
        env = os.environ.get("WORLD_SIZE")
        if env is None:
            if rank < 0 and not _C.sim_in_worker():
                _raise_missing_rank(rpc_backend_options.init_method)
            raise ValueError(
                "Tether needs world_size (dynamic RPC groups are not supported)"
            )
        world_size = int(env)
    if _C.is_initialized():
        raise RuntimeError("RPC is already initialized")
    opts = rpc_backend_options

    if _C.sim_in_worker():
        # Under tether.sim the simulator is the rendezvous (no init method needed) and the
        # injector of faults.
        if rank < 0 and "RANK" in os.environ:  # As env:// reads it (tether.sim sets it).
            rank = int(os.environ["RANK"])
        if rank < 0:
            raise ValueError("init_rpc under tether.sim needs rank (or $RANK)")
        if backend.name != "TENSORPIPE" or not isinstance(opts, TensorPipeRpcBackendOptions):
            raise ValueError(
                f"init_rpc under tether.sim runs Tether's engine on the simulator, which injects "
                f"faults itself (--faults): backend {backend.name} with "
                f"{type(opts).__name__} cannot apply there"
            )
        workers = _C.sim_listen(name, rank, world_size, opts.num_worker_threads, opts.rpc_timeout)
        try:
            infos = _C.connect(workers)
        except BaseException:
            _C.abandon_listen()
            raise
        api._init_rpc_states(api._AgentView(infos, rank))
        return

    store, rank, world_size = next(
        dist.rendezvous(opts.init_method, rank=rank, world_size=world_size)
    )
    _init_rpc_backend(backend, store, name, rank, world_size, opts)


def _raise_missing_rank(init_method: str):
    """The error PyTorch's rendezvous gives a worker of a dynamic group that names no rank."""
    scheme = init_method.split(":", 1)[0]
    if scheme == "env":
        if "RANK" in os.environ:
            return
        why = "environment variable RANK expected, but not set"
    else:
        why = "rank parameter missing"
    raise ValueError(f"Error initializing torch.distributed using {scheme}:// rendezvous: {why}")


def __getattr__(name):
    # BackendType is rebuilt by every register_backend: rpc.BackendType is always the current one
    # (PyTorch's goes stale after a registration, such as importing rpc._testing).
    if name == "BackendType":
        return backend_registry.BackendType
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _infer_backend(options):
    """The backend whose default options `options` is an instance of, trying the newest
    registered first (as PyTorch does); TypeError if none."""
    for candidate in backend_registry.BackendType:
        if isinstance(options, type(backend_registry.construct_rpc_backend_options(candidate))):
            return candidate
    raise TypeError(f"Could not infer backend for options {options}")


def _validate_rpc_args(backend, store, name, rank, world_size, rpc_backend_options):
    for arg, arg_type in (
        (backend, backend_registry.BackendType), (store, dist.Store), (name, str),
        (rank, numbers.Integral),
        (world_size, numbers.Integral),  # Required: Tether has no dynamic groups.
        (rpc_backend_options, RpcBackendOptions),
    ):
        if not isinstance(arg, arg_type):
            # PyTorch's words, which programs match.
            raise RuntimeError(f"Argument {arg} must be of type {arg_type} but got type {type(arg)}")


def _init_rpc_backend(backend=None, store=None, name=None, rank=-1, world_size=None,
                      rpc_backend_options=None):
    """init_rpc's second half, with PyTorch's name and arguments: runs `backend`'s init handler
    over a rendezvous store that torch.distributed made."""
    if backend is None:
        backend = backend_registry.BackendType.TENSORPIPE
    backend = backend_registry._current(backend) or backend
    _validate_rpc_args(backend, store, name, rank, world_size, rpc_backend_options)
    if api._is_current_rpc_agent_set():
        raise RuntimeError("RPC is already initialized")
    backend_registry.init_backend(
        backend, store=store, name=name, rank=rank, world_size=world_size,
        rpc_backend_options=rpc_backend_options,
    )
    if not api._is_current_rpc_agent_set():
        raise RuntimeError(
            f"RPC backend {backend.name}: its init handler returned without starting RPC"
        )


def _start_engine(store, name, rank, world_size, rpc_backend_options, faults=None):
    """Starts Tether's engine (the TENSORPIPE and FAULTY_TENSORPIPE backends' init handler):
    every worker publishes its name and address in `store` and reads everyone's
    (transport/rendezvous_protocol.h: the C++ rendezvous's exchange), then the agent is made
    current and started (api._init_rpc_states)."""
    global _init_counter, _store
    opts = rpc_backend_options
    timeout = opts.rpc_timeout
    store.set_timeout(timedelta(seconds=timeout if timeout > 0 else 3600 * 24))
    with _init_lock:
        # Keys stay in a store (a FileStore's file) after a run: each init in this process
        # gets its own prefix, so a second init_rpc does not read the first one's entries.
        store = dist.PrefixStore(f"tether_rpc_{_init_counter}", store)
        _init_counter += 1
    # (fail types, num_fail_sends, delays): only the FAULTY_TENSORPIPE handler passes them.
    fail_types, num_fail_sends, delays = faults or ([], 0, {})

    address = _C.listen(
        name, rank, opts.num_worker_threads, timeout,
        getattr(opts, "auth_token", None) or "",
        _publish_address(opts.init_method, opts),
        fail_types, num_fail_sends, delays,
    )
    try:
        workers = _C.exchange_addresses(
            store, rank, world_size, name, address, float(timeout), opts.init_method
        )
    except BaseException:
        _C.abandon_listen()
        raise
    infos = _C.connect(workers)
    api._init_rpc_states(api._AgentView(infos, rank))
    _store = store


def _rref_context_get_debug_info():
    """RRef counters with PyTorch's keys: num_owner_rrefs, num_pending_futures,
    num_pending_users, num_forks (values are strings, as in PyTorch)."""
    return _C.rref_debug_info()


@_require_initialized
def _get_debug_info():
    info = _rref_context_get_debug_info()
    info.update(_get_debug_info_agent())
    info.update({k: str(v) for k, v in _C.autograd_debug_info().items()})
    return info

