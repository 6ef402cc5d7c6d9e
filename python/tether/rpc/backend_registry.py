"""BackendType and the backend registry, as in torch.distributed.rpc.

Tether's engine serves the TENSORPIPE backend (the default), so programs that name it run
unchanged; importing ``tether.rpc._testing`` registers FAULTY_TENSORPIPE (the same engine with
injected send failures and delays, as PyTorch's faulty agent). ``register_backend`` extends the
enum as PyTorch's does; a registered backend's init handler runs at ``init_rpc``, but Tether can
only run its own engine: a handler that returns an agent of its own is refused with an error
naming the backend.

    backend = rpc.backend_registry.register_backend("MY", options_handler, init_handler)
    rpc.backend_registry.BackendType.MY is backend    # True (the enum is rebuilt)
"""
import collections
import enum

from . import constants
from .options import TensorPipeRpcBackendOptions

__all__ = ["init_backend", "backend_registered", "construct_rpc_backend_options",
           "register_backend", "BackendType", "BackendValue"]

BackendValue = collections.namedtuple(
    "BackendValue", ["construct_rpc_backend_options_handler", "init_backend_handler"]
)


def _backend_type_repr(self):
    return "BackendType." + self.name


def _make_enum(members):
    made = enum.Enum(value="BackendType", names=members)
    made.__repr__ = _backend_type_repr
    made.__doc__ = "The RPC backends: TENSORPIPE (Tether's engine) and any registered since."
    return made


def _tensorpipe_construct_rpc_backend_options_handler(
    rpc_timeout, init_method, num_worker_threads=constants.DEFAULT_NUM_WORKER_THREADS,
    _transports=None, _channels=None, **kwargs
):
    return TensorPipeRpcBackendOptions(
        rpc_timeout=rpc_timeout, init_method=init_method, num_worker_threads=num_worker_threads,
        _transports=_transports, _channels=_channels, **kwargs
    )


def _tensorpipe_init_backend_handler(store, name, rank, world_size, rpc_backend_options):
    from . import _start_engine

    if not isinstance(rpc_backend_options, TensorPipeRpcBackendOptions):
        raise TypeError(
            "`rpc_backend_options` must be a `TensorPipeRpcBackendOptions`, got "
            f"{type(rpc_backend_options).__name__}"
        )
    _start_engine(store, name, rank, world_size, rpc_backend_options)


BackendType = _make_enum({
    "TENSORPIPE": BackendValue(
        construct_rpc_backend_options_handler=_tensorpipe_construct_rpc_backend_options_handler,
        init_backend_handler=_tensorpipe_init_backend_handler,
    )
})


def _current(backend):
    """`backend` as a member of the current BackendType, or None if it is no BackendType member:
    a member of an earlier one (each registration makes a new enum) is looked up by name."""
    if isinstance(backend, BackendType):
        return backend
    if (isinstance(backend, enum.Enum) and type(backend).__name__ == "BackendType"
            and type(backend).__module__ == __name__ and backend.name in BackendType.__members__):
        return BackendType[backend.name]
    return None


def backend_registered(backend_name):
    """Whether ``backend_name`` names a member of BackendType."""
    return backend_name in BackendType.__members__


def register_backend(backend_name, construct_rpc_backend_options_handler, init_backend_handler):
    """Adds ``backend_name`` to BackendType (a new enum, as PyTorch makes; the newest backend comes
    first, which is the order init_rpc tries when it infers a backend from its options) and
    returns its member."""
    global BackendType
    if backend_registered(backend_name):
        raise RuntimeError("RPC backend {}: already registered".format(backend_name))
    members = {backend_name: BackendValue(
        construct_rpc_backend_options_handler=construct_rpc_backend_options_handler,
        init_backend_handler=init_backend_handler,
    )}
    members.update({m.name: m.value for m in BackendType})
    BackendType = _make_enum(members)
    return BackendType[backend_name]


def construct_rpc_backend_options(backend, rpc_timeout=constants.DEFAULT_RPC_TIMEOUT_SEC,
                                  init_method=constants.DEFAULT_INIT_METHOD, **kwargs):
    current = _current(backend)
    if current is None:
        raise TypeError(f"backend must be a member of BackendType, got {backend!r}")
    return current.value.construct_rpc_backend_options_handler(rpc_timeout, init_method, **kwargs)


def init_backend(backend, *args, **kwargs):
    """Runs ``backend``'s init handler. Tether's own handlers start its engine and return None."""
    agent = backend.value.init_backend_handler(*args, **kwargs)
    if agent is not None:
        raise RuntimeError(
            f"RPC backend {backend.name}: its init handler returned an agent "
            f"({type(agent).__name__}), but Tether runs only its own engine; a registered "
            "backend's handler must start RPC through tether.rpc (e.g. call another backend's "
            "init handler) and return None"
        )
