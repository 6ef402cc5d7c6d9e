"""Fault injection on real runs, as ``torch.distributed.rpc._testing``: importing this module
registers the FAULTY_TENSORPIPE backend, Tether's engine over a network that fails the first
``num_fail_sends`` sends of each message type in ``messages_to_fail`` and delays every send of a
type in ``messages_to_delay`` by its seconds (transport/faulty/faulty_network.h).

    import tether.rpc as rpc
    from tether.rpc._testing import FaultyTensorPipeRpcBackendOptions
    opts = FaultyTensorPipeRpcBackendOptions(
        num_worker_threads=8, rpc_timeout=20, init_method="env://",
        messages_to_fail=["RREF_FORK_REQUEST"], messages_to_delay={"PYTHON_CALL": 1.5},
        num_fail_sends=3)
    rpc.init_rpc("worker0", rank=0, world_size=2, rpc_backend_options=opts)

Message types are PyTorch's names. PyTorch sends builtin operators as SCRIPT_CALL and
SCRIPT_REMOTE_CALL, and Tether has one fetch message for Python and TorchScript values, so:
SCRIPT_CALL covers Tether's SCRIPT_CALL and BUILTIN_CALL, SCRIPT_REMOTE_CALL covers
SCRIPT_REMOTE_CALL and BUILTIN_REMOTE_CALL, and SCRIPT_RREF_FETCH_CALL and PYTHON_RREF_FETCH_CALL
both mean RREF_FETCH_CALL. Replies and acknowledgements cannot be named (as in PyTorch), and
init_rpc rejects any other name with a ValueError naming it.

One difference: PyTorch fails each distinct message ``num_fail_sends`` times (a retry of the
same message fails again until then); Tether fails the first ``num_fail_sends`` sends of each
named type, whichever messages they are.
"""
from typing import Dict, List, Tuple

from .. import backend_registry, constants
from ..options import TensorPipeRpcBackendOptions

__all__ = ["FaultyTensorPipeRpcBackendOptions", "is_available"]

# PyTorch's message type names that can be failed or delayed, and Tether's types they mean.
_TETHER_TYPES = {
    "PYTHON_CALL": ["PYTHON_CALL"],
    "SCRIPT_CALL": ["SCRIPT_CALL", "BUILTIN_CALL"],
    "PYTHON_REMOTE_CALL": ["PYTHON_REMOTE_CALL"],
    "SCRIPT_REMOTE_CALL": ["SCRIPT_REMOTE_CALL", "BUILTIN_REMOTE_CALL"],
    "SCRIPT_RREF_FETCH_CALL": ["RREF_FETCH_CALL"],
    "PYTHON_RREF_FETCH_CALL": ["RREF_FETCH_CALL"],
    "RREF_USER_DELETE": ["RREF_USER_DELETE"],
    "RREF_FORK_REQUEST": ["RREF_FORK_REQUEST"],
    "RREF_CHILD_ACCEPT": ["RREF_CHILD_ACCEPT"],
    "BACKWARD_AUTOGRAD_REQ": ["BACKWARD_AUTOGRAD_REQ"],
    "CLEANUP_AUTOGRAD_CONTEXT_REQ": ["CLEANUP_AUTOGRAD_CONTEXT_REQ"],
}


def is_available() -> bool:
    return True


def _tether_types(name: str, what: str) -> List[str]:
    types = _TETHER_TYPES.get(name)
    if types is None:
        raise ValueError(
            f"{what}: unknown or unsupported message type {name!r}; FAULTY_TENSORPIPE can "
            f"fail or delay: {', '.join(sorted(_TETHER_TYPES))}"
        )
    return types


class FaultyTensorPipeRpcBackendOptions(TensorPipeRpcBackendOptions):
    """TensorPipeRpcBackendOptions plus the faults to inject (see the module's text)."""

    def __init__(
        self,
        *,
        num_worker_threads: int,
        rpc_timeout: float,
        init_method: str,
        messages_to_fail: List[str],
        messages_to_delay: Dict[str, float],
        num_fail_sends: int,
    ):
        super().__init__(num_worker_threads=num_worker_threads, rpc_timeout=rpc_timeout,
                         init_method=init_method)
        self.messages_to_fail = list(messages_to_fail)
        self.messages_to_delay = {str(k): float(v) for k, v in dict(messages_to_delay).items()}
        self.num_fail_sends = int(num_fail_sends)

    def _tether_faults(self) -> Tuple[List[str], int, Dict[str, float]]:
        """The faults in Tether's message type names (ValueError naming an unknown name)."""
        fail_types: List[str] = []
        for name in self.messages_to_fail:
            for t in _tether_types(name, "messages_to_fail"):
                if t not in fail_types:
                    fail_types.append(t)
        delays: Dict[str, float] = {}
        for name, seconds in self.messages_to_delay.items():
            for t in _tether_types(name, "messages_to_delay"):
                delays[t] = seconds
        if self.num_fail_sends < 0:
            raise ValueError(f"num_fail_sends must be >= 0, got {self.num_fail_sends}")
        return fail_types, self.num_fail_sends, delays


def _construct_options(rpc_timeout, init_method, num_worker_threads=constants.DEFAULT_NUM_WORKER_THREADS,
                       messages_to_fail=(), messages_to_delay=None, num_fail_sends=0, **kwargs):
    return FaultyTensorPipeRpcBackendOptions(
        num_worker_threads=num_worker_threads, rpc_timeout=rpc_timeout, init_method=init_method,
        messages_to_fail=list(messages_to_fail), messages_to_delay=dict(messages_to_delay or {}),
        num_fail_sends=num_fail_sends,
    )


def _init_backend(store, name, rank, world_size, rpc_backend_options):
    from .. import _start_engine

    if not isinstance(rpc_backend_options, FaultyTensorPipeRpcBackendOptions):
        raise TypeError(
            "`rpc_backend_options` must be a `FaultyTensorPipeRpcBackendOptions`, got "
            f"{type(rpc_backend_options).__name__}"
        )
    _start_engine(store, name, rank, world_size, rpc_backend_options,
                  faults=rpc_backend_options._tether_faults())


if not backend_registry.backend_registered("FAULTY_TENSORPIPE"):
    backend_registry.register_backend("FAULTY_TENSORPIPE", _construct_options, _init_backend)
