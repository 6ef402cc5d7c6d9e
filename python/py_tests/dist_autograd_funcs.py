"""Functions the distributed autograd tests run on other workers (importable by every worker)."""
import time

import torch

import tether.autograd as dist_autograd
import tether.rpc as rpc


def mul_add(a, b):
    return a * b + a


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
