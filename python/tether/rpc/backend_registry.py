"""BackendType, as in torch.distributed.rpc. Tether's engine serves the TENSORPIPE backend (the
default), so programs that name it run unchanged."""
import enum

from . import constants
from .options import TensorPipeRpcBackendOptions


class BackendType(enum.Enum):
    TENSORPIPE = "TENSORPIPE"

    def __repr__(self):
        return f"BackendType.{self.name}"


def construct_rpc_backend_options(backend, rpc_timeout=constants.DEFAULT_RPC_TIMEOUT_SEC,
                                  init_method=constants.DEFAULT_INIT_METHOD, **kwargs):
    if backend != BackendType.TENSORPIPE:
        raise ValueError(f"unknown backend {backend!r}")
    return TensorPipeRpcBackendOptions(rpc_timeout=rpc_timeout, init_method=init_method, **kwargs)


def backend_registered(backend_name):
    return backend_name in BackendType.__members__


def register_backend(backend_name, construct_rpc_backend_options_handler, init_backend_handler):
    if backend_registered(backend_name):
        raise RuntimeError("RPC backend {}: already registered".format(backend_name))
    raise RuntimeError("Tether does not support registering other RPC backends")
