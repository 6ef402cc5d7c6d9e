"""rref.rpc_sync().method(...), .rpc_async(), .remote(): run a method of the value on its owner,
in one round trip (the owner looks the method up and honours @async_execution on it)."""
from functools import partial

import torch

from . import api, functions


@functions.async_execution
def _local_invoke(rref, func_name, args, kwargs):
    method = getattr(rref.local_value(), func_name)
    if hasattr(method, "_wrapped_async_rpc_function"):
        return method(*args, **kwargs)
    # A method that raises raises here: the call's remote exception, as in PyTorch.
    fut = torch.futures.Future()
    fut.set_result(method(*args, **kwargs))
    return fut


def _invoke(rref, api_name, timeout, func_name, *args, **kwargs):
    send = getattr(api, api_name)
    return send(rref.owner(), _local_invoke, args=(rref, func_name, args, kwargs), timeout=timeout)


class RRefProxy:
    def __init__(self, rref, rpc_api, timeout=-1.0):
        self.rref = rref
        self.rpc_api = rpc_api
        self.rpc_timeout = timeout

    def __getattr__(self, func_name):
        return partial(_invoke, self.rref, self.rpc_api, self.rpc_timeout, func_name)
