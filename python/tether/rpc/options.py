"""Backend options: PyTorch's TensorPipeRpcBackendOptions surface, and Tether's own."""
import numbers
from typing import Dict, List, Optional

from . import constants


class RpcBackendOptions:
    """Options common to every backend: the default timeout and the rendezvous URL."""

    def __init__(self, rpc_timeout: float = constants.DEFAULT_RPC_TIMEOUT_SEC,
                 init_method: str = constants.DEFAULT_INIT_METHOD):
        if isinstance(rpc_timeout, bool) or not isinstance(rpc_timeout, numbers.Real):
            # PyTorch's options are a pybind11 class: its words, which programs match.
            raise TypeError(
                f"{type(self).__name__}.__init__(): incompatible constructor arguments: "
                f"rpc_timeout must be a number of seconds, got {type(rpc_timeout).__name__} "
                f"{rpc_timeout!r}"
            )
        self.rpc_timeout = float(rpc_timeout)
        self.init_method = init_method


def _reject_cuda(what: str):
    raise ValueError(
        f"{what}: Tether sends CPU tensors only and does not support CUDA device maps; "
        "move tensors to the CPU before sending them"
    )


class TensorPipeRpcBackendOptions(RpcBackendOptions):
    r"""Accepted as in torch.distributed.rpc. ``num_worker_threads``, ``rpc_timeout`` and
    ``init_method`` are honoured. ``device_maps``/``devices`` (CUDA RPC) are rejected with a
    ValueError. ``_transports`` may be ``None`` or ``["uv"]`` (TCP, which is what Tether uses);
    ``_channels`` may be ``None`` or only name the basic CPU channel; anything else is rejected.
    """

    def __init__(
        self,
        *,
        num_worker_threads: int = constants.DEFAULT_NUM_WORKER_THREADS,
        rpc_timeout: float = constants.DEFAULT_RPC_TIMEOUT_SEC,
        init_method: str = constants.DEFAULT_INIT_METHOD,
        device_maps: Optional[Dict] = None,
        devices: Optional[List] = None,
        _transports: Optional[List] = None,
        _channels: Optional[List] = None,
    ):
        super().__init__(rpc_timeout, init_method)
        if not isinstance(num_worker_threads, int) or num_worker_threads <= 0:
            raise ValueError(f"num_worker_threads must be positive, got {num_worker_threads}")
        self.num_worker_threads = num_worker_threads
        if device_maps:
            _reject_cuda("device_maps")
        if devices:
            _reject_cuda("devices")
        if _transports is not None and list(_transports) not in ([], ["uv"]):
            raise ValueError(
                f"_transports={_transports!r}: Tether has one transport (TCP, like TensorPipe's "
                "'uv'); pass None or ['uv']"
            )
        if _channels is not None and not set(_channels) <= {"basic"}:
            raise ValueError(
                f"_channels={_channels!r}: Tether moves tensors over its TCP transport only; "
                "pass None or ['basic']"
            )
        self._transports = _transports
        self._channels = _channels

    @property
    def device_maps(self) -> Dict:
        return {}

    @property
    def devices(self) -> List:
        return []

    @devices.setter
    def devices(self, value):
        if value:
            _reject_cuda("devices")

    def set_device_map(self, to: str, device_map: Dict):
        _reject_cuda("set_device_map")

    def set_devices(self, devices: List):
        if devices:
            _reject_cuda("set_devices")


class TetherRpcBackendOptions(TensorPipeRpcBackendOptions):
    r"""TensorPipeRpcBackendOptions plus Tether's own settings.

    Args:
        auth_token (str, optional): shared secret every worker must present (HMAC challenge on
            every connection). Default: ``$TETHER_AUTH_TOKEN``, else none.
        interface (str, optional): the address this worker listens on and publishes to the
            others, or the name of the network interface whose address to use (``eth0``).
            Default: ``$TETHER_SOCKET_IFNAME``'s address if set, else 127.0.0.1 when the
            rendezvous host is loopback, else the local address that reaches the rendezvous
            host (for file://, loopback: set it for a multi-host file:// run).
        connect_timeout (float): seconds to wait for the other workers' connections.
    """

    def __init__(self, *, auth_token: Optional[str] = None, interface: Optional[str] = None,
                 connect_timeout: float = 60.0, **kwargs):
        super().__init__(**kwargs)
        self.auth_token = auth_token
        self.interface = interface
        self.connect_timeout = float(connect_timeout)
