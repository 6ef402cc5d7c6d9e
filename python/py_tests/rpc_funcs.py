"""Functions and classes the py_tests call remotely (importable by every worker process)."""
import os
import signal
import time

import torch

import tether.rpc as rpc


def noop():
    return None


def add(a, b):
    return a + b


def echo(x):
    return x


def kw(a, b=1, *, c=0):
    return (a, b, c)


def raise_value_error():
    raise ValueError("Expected error")


def raise_key_error():
    raise KeyError("missing-key")


def sleep(seconds):
    time.sleep(seconds)
    return seconds


def my_name():
    return rpc.get_worker_info().name


def mutate_in_place(t):
    t.add_(100)
    return t


def storage_ptr_and_sum(t):
    return t.data_ptr(), float(t.sum())


def return_unpicklable():
    return lambda: 1


def requires_grad(t):
    return t.requires_grad


@torch.jit.script
def script_add(x: torch.Tensor, y: int) -> torch.Tensor:
    return x + y


@rpc.functions.async_execution
def async_add_chained(to, x, y, z):
    # Returns at once; the reply is sent when the nested call completes.
    return rpc.rpc_async(to, add, args=(x, y)).then(lambda fut: fut.wait() + z)


@rpc.functions.async_execution
def async_nested(depth, to_names):
    if depth == 0:
        fut = torch.futures.Future()
        fut.set_result(0)
        return fut
    nxt = to_names[depth % len(to_names)]
    return rpc.rpc_async(nxt, async_nested, args=(depth - 1, to_names)).then(
        lambda fut: fut.wait() + 1)


@rpc.functions.async_execution
def async_wrong_return():
    return 3


class Counter:
    def __init__(self, start=0):
        self.value = start
        self._lock = __import__("threading").Lock()  # unpicklable on purpose

    def increment(self, by=1):
        with self._lock:
            self.value += by
            return self.value

    def get(self):
        return self.value

    @rpc.functions.async_execution
    def async_get_plus(self, n):
        fut = torch.futures.Future()
        fut.set_result(self.value + n)
        return fut

    def fail(self):
        raise RuntimeError("counter failure")


def make_counter(start):
    return Counter(start)


def rref_to_here(rref):
    return rref.to_here()


def rref_local_plus(rref, n):
    return rref.local_value() + n


def rref_owner_name(rref):
    return rref.owner_name()


def create_local_rref(value):
    return rpc.RRef(value)


def forward_rref(to, rref):
    # Passes a received RRef on to a third worker, which fetches its value.
    return rpc.rpc_sync(to, rref_to_here, args=(rref,))


def rref_debug_info():
    return rpc._rref_context_get_debug_info()


_held = []


def hold_rref(rref):
    _held.append(rref)
    return len(_held)


def clear_held():
    _held.clear()


def torch_ops(t):
    """Runs aten::add then aten::mul (what a profiled callee should report)."""
    return torch.mul(torch.add(t, 1), 2)


def profiler_enabled():
    return torch.autograd._profiler_enabled()


def torch_ops_with_rref(rref, t):
    """torch_ops(t), in a call that waits for its RRef argument to be confirmed first."""
    return torch_ops(t)


# --- futures and errors as PyTorch's -------------------------------------------------------------
_gate = __import__("threading").Event()


def wait_for_gate(timeout):
    """Blocks until open_gate() (or `timeout` seconds); returns whether it was opened."""
    opened = _gate.wait(timeout)
    _gate.clear()
    return opened


def open_gate():
    _gate.set()


ESCAPED_TEXT = "\nFirst line of error \n next line of error \n last line 'quoted' \"twice\""


def raise_escaped():
    raise ValueError(ESCAPED_TEXT)


@rpc.functions.async_execution
def async_wrong_return_list():
    return [1]


@rpc.functions.async_execution
def async_nested_raise(to):
    # The returned future fails (a failed call): PyTorch replies with that error's text.
    return rpc.rpc_async(to, raise_value_error)


@rpc.functions.async_execution
def async_then_raises(to):
    return rpc.rpc_async(to, add, args=(1, 1)).then(lambda fut: 1 / 0)
