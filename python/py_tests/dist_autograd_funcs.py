"""Functions the distributed autograd tests run on other workers (importable by every worker)."""
import time

import torch

import tether.autograd as dist_autograd
import tether.rpc as rpc


def mul_add(a, b):
    return a * b + a


def py_add(a, b):
    return a + b


def nested_add(dst, a, b):
    """Forwards to `dst`, then works on the result: a chain A -> B -> dst."""
    return rpc.rpc_sync(dst, torch.add, args=(a * 2, b)) * 3


def split_in_two(t):
    return torch.split(t, t.shape[0] // 2)


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise ValueError("Simulate error on backward pass")


def fails_in_backward(t):
    return _FailingBackward.apply(t * 1)


def context_is_valid(context_id):
    try:
        dist_autograd._retrieve_context(context_id)
        return True
    except RuntimeError:
        return False


def wait_context_released(context_id, timeout_s=20.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if not context_is_valid(context_id):
            return True
        time.sleep(0.05)
    return False


def known_and_recv(context_id):
    ctx = dist_autograd._retrieve_context(context_id)
    return sorted(ctx._known_worker_ids()), len(ctx._recv_functions()), len(ctx._send_functions())


def linear(seed, n_in, n_out):
    torch.manual_seed(seed)
    return torch.nn.Linear(n_in, n_out)


def param_rrefs(module_rref):
    return [rpc.RRef(p) for p in module_rref.local_value().parameters()]


def params_of(module_rref):
    return [p.detach().clone() for p in module_rref.local_value().parameters()]


def grads_of(module_rref, context_id):
    grads = dist_autograd.get_gradients(context_id)
    return [grads[p] for p in module_rref.local_value().parameters()]


def ones_requiring_grad(shape):
    return torch.ones(shape, requires_grad=True)


def rref_add(rref, t):
    return torch.add(rref.to_here(), t)


def rref_grad(rref, context_id):
    return dist_autograd.get_gradients(context_id)[rref.local_value()]


_fail_backward = [False]


def set_backward_failure(on):
    _fail_backward[0] = on


class _MaybeFailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        if _fail_backward[0]:
            raise ValueError("Simulate error on backward pass")
        return grad


def maybe_fails_in_backward(a, b):
    return _MaybeFailingBackward.apply(a * b)


def sum_of_rref(rref):
    return rref.to_here().sum()


def slow_mul_add(a, b, delay_s=0.3):
    """`mul_add` that takes a while, so a remote() of it is still unconfirmed when its RRef is
    passed on."""
    time.sleep(delay_s)
    return mul_add(a, b)


def rref_to_here_times(rref, k):
    """Called on a third worker inside a context: fetches a value it does not own."""
    return rref.to_here() * k


@rpc.functions.async_execution
def async_mul_add_now(a, b):
    """An async_execution function whose Future is complete when it returns."""
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(mul_add(a, b))
    return fut


@rpc.functions.async_execution
def async_nested_add(dst, a, b):
    """An async_execution function whose reply waits for a nested call to `dst`, then works on
    its result in the callback."""
    return rpc.rpc_async(dst, torch.add, args=(a * 2, b)).then(lambda fut: fut.wait() * 3)


def owner_optimizer_class(optimizer_rref):
    """The class of the local optimizer behind a DistributedOptimizer's RRef (on its owner)."""
    return type(optimizer_rref.local_value()._optim).__name__


def asgd_state_of(module_rref, optimizer_rref):
    """ASGD's per-parameter state (eta, mu, ax) on the owner, in parameter order."""
    state = optimizer_rref.local_value()._optim.state
    return [(float(state[p]["eta"]), float(state[p]["mu"]), state[p]["ax"].clone())
            for p in module_rref.local_value().parameters()]


class OptimizerFailingOnConstructor(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})
        raise ValueError("Error creating optimizer.")

    def step(self, closure=None):
        raise NotImplementedError


class FailingOptimizer(torch.optim.Optimizer):
    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        raise ValueError("Error running optimizer.")


def num_local_records():
    """Contexts this worker's autograd glue still keeps nodes or gradients for."""
    from tether import _C
    return _C.autograd_num_local_records()


def wait_no_local_records(timeout_s=20.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if num_local_records() == 0:
            return True
        time.sleep(0.05)
    return num_local_records() == 0


class _RpcInBackward(torch.autograd.Function):
    """Its backward makes an RPC with a tensor that requires grad (outside any context)."""

    @staticmethod
    def forward(ctx, x):
        return x * 1

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            probe = torch.ones(2, requires_grad=True)
            rpc.rpc_sync("worker2", mul_add, args=(probe, probe))
        return grad


def rpc_in_backward(t):
    return _RpcInBackward.apply(t)
