"""tether.autograd and tether.optim across three workers, checked the way PyTorch's
dist_autograd and dist_optimizer tests check them: gradients equal local autograd's, graphs have
the send and receive functions PyTorch records, errors carry PyTorch's texts, contexts are released
everywhere. The test process is worker0; worker1 and worker2 are spawned processes."""
import logging
import os
import sys
from typing import Callable, List, Optional

import pytest
import torch

import tether.autograd as dist_autograd
import tether.rpc as rpc
from tether.optim import DistributedOptimizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_autograd_funcs as f  # noqa: E402
import harness  # noqa: E402

WORLD = 3


@pytest.fixture(scope="module", autouse=True)
def group():
    yield from harness.group(WORLD)


def leaves(*shapes, seed=0):
    torch.manual_seed(seed)
    return [torch.rand(*s, requires_grad=True) for s in shapes]


def local_grads(fn, *inputs):
    copies = [t.detach().clone().requires_grad_(True) for t in inputs]
    fn(*copies).sum().backward()
    return [c.grad for c in copies]


def next_names(fn) -> List[str]:
    return [next_fn.name() for next_fn, _ in fn.next_functions]


SEND = "torch::distributed::autograd::SendRpcBackward"
RECV = "torch::distributed::autograd::RecvRpcBackward"
ACCUMULATE = "torch::autograd::AccumulateGrad"


# --- contexts ------------------------------------------------------------------------------------

def test_context_ids_and_errors():
    with dist_autograd.context() as context_id:
        assert context_id >> 48 == 0
        assert dist_autograd._current_context()._context_id() == context_id
        with pytest.raises(RuntimeError, match="Already have an autograd context id for this thread"):
            with dist_autograd.context():
                pass
    assert dist_autograd._get_max_id() == (1 << 48) - 1
    with pytest.raises(RuntimeError, match="Current thread doesn't have a valid autograd context"):
        dist_autograd._current_context()
    with pytest.raises(RuntimeError, match="Could not find autograd context with id: 12345"):
        dist_autograd._retrieve_context(12345)
    with pytest.raises(RuntimeError, match="Could not find autograd context with id"):
        dist_autograd.backward(12345, [torch.ones(1, requires_grad=True).sum()])
    assert set(dist_autograd._get_debug_info()) == {
        "num_current_backward_passes", "num_autograd_contexts"}


def test_backward_invalid_args():
    with dist_autograd.context() as context_id:
        with pytest.raises(TypeError, match="incompatible function arguments"):
            dist_autograd.backward(context_id, None)
        with pytest.raises(RuntimeError, match="No tensors provided for gradient computation"):
            dist_autograd.backward(context_id, [])
        with pytest.raises(RuntimeError, match="requires_grad not set on root"):
            dist_autograd.backward(context_id, [torch.rand(1)])
        t = torch.rand(3, 3, requires_grad=True)
        with pytest.raises(RuntimeError, match="is not a scalar, all roots need to be scalar"):
            dist_autograd.backward(context_id, [t * 2])
        with pytest.raises(RuntimeError, match="does not have a valid gradient function"):
            dist_autograd.backward(context_id, [torch.rand(1, requires_grad=True)])


def test_known_workers_recorded_without_grad_and_released_everywhere():
    with dist_autograd.context() as context_id:
        t1, t2 = torch.ones(3), torch.zeros(3)
        for dst in ("worker1", "worker2"):
            rpc.rpc_sync(dst, torch.add, args=(t1, t2))  # builtin without grad: not recorded
            rpc.rpc_sync(dst, f.mul_add, args=(t1, t2))  # Python call: always recorded
        assert dist_autograd._current_context()._known_worker_ids() == {1, 2}
        assert rpc.rpc_sync("worker1", f.context_is_valid, args=(context_id,))
    for dst in ("worker1", "worker2"):
        assert rpc.rpc_sync(dst, f.wait_context_released, args=(context_id,))


# --- backward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dst", ["worker1", "worker0"])
def test_builtin_call_gradients_and_graph(dst):
    t1, t2 = leaves((3, 3), (3, 3))
    with dist_autograd.context() as context_id:
        ret = rpc.rpc_sync(dst, torch.add, args=(t1, t2))
        ctx = dist_autograd._current_context()
        sends = list(ctx._send_functions().values())
        recvs = list(ctx._recv_functions().values())
        if dst == "worker1":
            assert len(sends) == 1 and len(recvs) == 1
            assert sends[0].name() == "torch::distributed::autograd::SendRpcBackward"
            assert recvs[0].name() == "torch::distributed::autograd::RecvRpcBackward"
            assert ret.grad_fn is recvs[0]
            assert [fn.name() for fn, _ in sends[0].next_functions] == [
                "torch::autograd::AccumulateGrad"] * 2
            assert ctx._known_worker_ids() == {1}
        dist_autograd.backward(context_id, [ret.sum()])
        grads = dist_autograd.get_gradients(context_id)
        assert torch.equal(grads[t1], torch.ones(3, 3))
        assert torch.equal(grads[t2], torch.ones(3, 3))
        assert t1.grad is None and t2.grad is None


def test_python_udf_gradients_match_local():
    t1, t2 = leaves((4,), (4,), seed=1)
    with dist_autograd.context() as context_id:
        fut = rpc.rpc_async("worker2", f.mul_add, args=(t1, t2))
        loss = (fut.wait() * 5).sum()
        dist_autograd.backward(context_id, [loss])
        grads = dist_autograd.get_gradients(context_id)
    g1, g2 = local_grads(lambda a, b: f.mul_add(a, b) * 5, t1, t2)
    assert torch.allclose(grads[t1], g1) and torch.allclose(grads[t2], g2)


@pytest.mark.parametrize("hop", ["worker2", "worker0"])
def test_nested_call_gradients_and_release(hop):
    # worker0 -> worker1 -> `hop` (worker2: a chain; worker0: back to the initiator, a cycle).
    t1, t2 = leaves((3,), (3,), seed=2)
    with dist_autograd.context() as context_id:
        ret = rpc.rpc_sync("worker1", f.nested_add, args=(hop, t1, t2))
        dist_autograd.backward(context_id, [ret.sum()])
        grads = dist_autograd.get_gradients(context_id)
        if hop == "worker2":
            known, recvs, sends = rpc.rpc_sync("worker2", f.known_and_recv, args=(context_id,))
            assert known == [1] and recvs == 1 and sends == 1
    g1, g2 = local_grads(lambda a, b: torch.add(a * 2, b) * 3, t1, t2)
    assert torch.allclose(grads[t1], g1) and torch.allclose(grads[t2], g2)
    for dst in ("worker1", "worker2"):
        assert rpc.rpc_sync(dst, f.wait_context_released, args=(context_id,))


@pytest.mark.parametrize("fn", [f.mul_add, torch.mul])
def test_remote_then_to_here_gradients_match_local(fn):
    t1, t2 = leaves((3,), (3,), seed=6)
    with dist_autograd.context() as context_id:
        rref = rpc.remote("worker1", fn, args=(t1, t2))
        ret = rref.to_here()
        assert ret.grad_fn is not None
        dist_autograd.backward(context_id, [(ret * 2).sum()])
        grads = dist_autograd.get_gradients(context_id)
        assert dist_autograd._current_context()._known_worker_ids() == {1}
    g1, g2 = local_grads(lambda a, b: fn(a, b) * 2, t1, t2)
    assert torch.allclose(grads[t1], g1) and torch.allclose(grads[t2], g2)


def test_rref_argument_owned_by_the_callee_gets_its_gradient_there():
    (t2,) = leaves((3, 3), seed=7)
    rref_t1 = rpc.remote("worker1", f.ones_requiring_grad, args=((3, 3),))
    with dist_autograd.context() as context_id:
        ret = rpc.rpc_sync("worker1", f.rref_add, args=(rref_t1, t2))
        dist_autograd.backward(context_id, [ret.sum()])
        grads = dist_autograd.get_gradients(context_id)
        assert torch.equal(grads[t2], torch.ones(3, 3))
        owner_grad = rpc.rpc_sync("worker1", f.rref_grad, args=(rref_t1, context_id))
        assert torch.equal(owner_grad, torch.ones(3, 3))


def test_rref_backward_on_owner_and_user():
    (t,) = leaves((3,), seed=9)
    owner_rref = rpc.RRef((t * 2).sum())
    owner_rref.backward()  # local autograd
    assert torch.equal(t.grad, torch.full((3,), 2.0))
    t.grad = None
    with pytest.raises(RuntimeError, match="RRef should contain a tensor for .backward()"):
        rpc.RRef(1).backward()
    with dist_autograd.context() as context_id:
        user_rref = rpc.remote("worker1", f.mul_add, args=(t, t))
        with pytest.raises(RuntimeError, match="User RRefs require 'dist_autograd_ctx_id'"):
            user_rref.backward()
        loss_rref = rpc.remote("worker1", f.sum_of_rref, args=(user_rref,))
        loss_rref.backward(context_id)
        grads = dist_autograd.get_gradients(context_id)
        assert t.grad is None
    (g,) = local_grads(lambda a: f.mul_add(a, a), t)
    assert torch.allclose(grads[t], g)
    assert "num_autograd_contexts" in rpc._get_debug_info()


def test_multiple_output_tensors_and_unused_ones():
    (t,) = leaves((4, 2), seed=3)
    with dist_autograd.context() as context_id:
        first, second = rpc.rpc_sync("worker1", f.split_in_two, args=(t,))
        dist_autograd.backward(context_id, [(first * 3).sum()])  # `second` never used
        grads = dist_autograd.get_gradients(context_id)
    expected = torch.zeros(4, 2)
    expected[:2] = 3
    assert torch.equal(grads[t], expected)


def test_retain_graph_accumulates_and_a_second_pass_without_it_fails():
    t1, t2 = leaves((3,), (3,), seed=4)
    with dist_autograd.context() as context_id:
        loss = rpc.rpc_sync("worker1", f.mul_add, args=(t1, t2)).sum()
        for _ in range(3):
            dist_autograd.backward(context_id, [loss], retain_graph=True)
        dist_autograd.backward(context_id, [loss])
        grads = dist_autograd.get_gradients(context_id)
        g1, g2 = local_grads(f.mul_add, t1, t2)
        assert torch.allclose(grads[t1], 4 * g1) and torch.allclose(grads[t2], 4 * g2)
        with pytest.raises(RuntimeError, match="Trying to backward through the graph a second time"):
            dist_autograd.backward(context_id, [loss])


def test_error_deep_in_a_chain_names_the_node():
    (t,) = leaves((2,), seed=5)
    with dist_autograd.context() as context_id:
        val = rpc.rpc_sync("worker2", f.fails_in_backward, args=(t,))
        val = rpc.rpc_sync("worker1", torch.mul, args=(val, t))
        val = rpc.rpc_sync("worker2", torch.add, args=(val, t))
        with pytest.raises(RuntimeError, match="Error on Node 2:.*Simulate error on backward pass"):
            dist_autograd.backward(context_id, [val.sum()])


def test_repeated_backward_with_errors_then_recovery_in_one_context():
    t1, t2 = leaves((3,), (3,), seed=8)
    rpc.rpc_sync("worker1", f.set_backward_failure, args=(True,))
    with dist_autograd.context() as context_id:
        loss = rpc.rpc_sync("worker1", f.maybe_fails_in_backward, args=(t1, t2)).sum()
        for _ in range(3):
            with pytest.raises(RuntimeError, match="Error on Node 1:.*Simulate error on backward"):
                dist_autograd.backward(context_id, [loss], retain_graph=True)
        # The failing node is on worker1, before the send back to worker0: nothing accumulated.
        assert dist_autograd.get_gradients(context_id) == {}
        rpc.rpc_sync("worker1", f.set_backward_failure, args=(False,))
        for _ in range(2):
            dist_autograd.backward(context_id, [loss], retain_graph=True)
        grads = dist_autograd.get_gradients(context_id)
    g1, g2 = local_grads(lambda a, b: a * b, t1, t2)
    assert set(grads) == {t1, t2}
    assert torch.allclose(grads[t1], 2 * g1) and torch.allclose(grads[t2], 2 * g2)
    assert t1.grad is None and t2.grad is None


# --- self calls --------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [torch.add, f.py_add])
def test_self_rpc_sync_records_request_and_reply_pairs(fn):
    # As PyTorch: a call to oneself records the request's send and receive and the reply's
    # send and receive, all in this worker's context.
    t1, t2 = leaves((3, 3), (3, 3), seed=12)
    with dist_autograd.context() as context_id:
        ret = rpc.rpc_sync("worker0", fn, args=(t1, t2))
        ctx = dist_autograd._current_context()
        sends = list(ctx._send_functions().values())
        recvs = list(ctx._recv_functions().values())
        assert len(sends) == 2 and len(recvs) == 2
        assert ctx._known_worker_ids() == {0}
        assert ret.grad_fn in recvs  # the reply's receive
        (request_recv,) = [r for r in recvs if r is not ret.grad_fn]
        (request_send,) = [s for s in sends if next_names(s) == [ACCUMULATE] * 2]
        (reply_send,) = [s for s in sends if s is not request_send]
        assert all(node.name() == SEND for node in sends)
        assert all(node.name() == RECV for node in recvs)
        assert next_names(reply_send) == ["AddBackward0"]
        add_fn = reply_send.next_functions[0][0]
        assert [n for n, _ in add_fn.next_functions] == [request_recv, request_recv]
        dist_autograd.backward(context_id, [(ret * t1).sum()])
        grads = dist_autograd.get_gradients(context_id)
    g1, g2 = local_grads(lambda a, b: torch.add(a, b) * a, t1, t2)
    assert torch.allclose(grads[t1], g1) and torch.allclose(grads[t2], g2)
    assert t1.grad is None and t2.grad is None


@pytest.mark.parametrize("fn", [torch.add, f.py_add])
def test_self_remote_records_the_request_pair_and_to_here_is_local(fn):
    # As PyTorch: remote() to oneself records the request's send and receive; to_here() on the
    # owner returns the value itself, whose graph reaches the request's receive.
    t1, t2 = leaves((3, 3), (3, 3), seed=13)
    with dist_autograd.context() as context_id:
        ret = rpc.remote("worker0", fn, args=(t1, t2)).to_here()
        ctx = dist_autograd._current_context()
        sends = list(ctx._send_functions().values())
        recvs = list(ctx._recv_functions().values())
        assert len(sends) == 1 and len(recvs) == 1
        assert ctx._known_worker_ids() == {0}
        assert sends[0].name() == SEND and recvs[0].name() == RECV
        assert next_names(sends[0]) == [ACCUMULATE] * 2
        assert ret.grad_fn.name() == "AddBackward0"
        assert [n for n, _ in ret.grad_fn.next_functions] == [recvs[0], recvs[0]]
        dist_autograd.backward(context_id, [(ret * t1).sum()])
        grads = dist_autograd.get_gradients(context_id)
    g1, g2 = local_grads(lambda a, b: torch.add(a, b) * a, t1, t2)
    assert torch.allclose(grads[t1], g1) and torch.allclose(grads[t2], g2)
    assert t1.grad is None and t2.grad is None


# --- async_execution and RRefs confirmed later ---------------------------------------------------

@pytest.mark.parametrize("hop", [None, "worker2", "worker0"])
def test_async_execution_function_gradients_match_local(hop):
    # hop None: the function returns a completed Future; otherwise its reply waits for a nested
    # call to `hop` (worker2: a chain; worker0: back to the initiator) and a callback.
    t1, t2 = leaves((3,), (3,), seed=14)
    with dist_autograd.context() as context_id:
        if hop is None:
            ret = rpc.rpc_sync("worker1", f.async_mul_add_now, args=(t1, t2))
        else:
            ret = rpc.rpc_sync("worker1", f.async_nested_add, args=(hop, t1, t2))
        assert ret.grad_fn is not None and ret.grad_fn.name() == RECV
        dist_autograd.backward(context_id, [(ret * 5).sum()])
        grads = dist_autograd.get_gradients(context_id)
        assert 1 in dist_autograd._current_context()._known_worker_ids()
    if hop is None:
        g1, g2 = local_grads(lambda a, b: f.mul_add(a, b) * 5, t1, t2)
    else:
        g1, g2 = local_grads(lambda a, b: torch.add(a * 2, b) * 3 * 5, t1, t2)
    assert torch.allclose(grads[t1], g1) and torch.allclose(grads[t2], g2)
    for dst in ("worker1", "worker2"):
        assert rpc.rpc_sync(dst, f.wait_context_released, args=(context_id,))


@pytest.mark.parametrize("fetcher", ["worker2", "worker1"])
def test_remote_value_fetched_inside_the_context_before_it_is_confirmed(fetcher):
    # remote() on worker1 takes a while; its RRef goes at once to `fetcher` (worker2: a third
    # worker, a fork of an unconfirmed RRef; worker1: the owner), which calls to_here() inside
    # the context. The gradient crosses worker0 -> fetcher -> worker1 -> worker0.
    t1, t2 = leaves((3,), (3,), seed=15)
    with dist_autograd.context() as context_id:
        rref = rpc.remote("worker1", f.slow_mul_add, args=(t1, t2))
        ret = rpc.rpc_sync(fetcher, f.rref_to_here_times, args=(rref, 3.0))
        dist_autograd.backward(context_id, [ret.sum()])
        grads = dist_autograd.get_gradients(context_id)
        assert dist_autograd._current_context()._known_worker_ids() == {1, int(fetcher[-1])}
    g1, g2 = local_grads(lambda a, b: f.mul_add(a, b) * 3, t1, t2)
    assert torch.allclose(grads[t1], g1) and torch.allclose(grads[t2], g2)
    for dst in ("worker1", "worker2"):
        assert rpc.rpc_sync(dst, f.wait_context_released, args=(context_id,))


# --- DistributedOptimizer ------------------------------------------------------------------------

def train_and_compare_with_local(
    owner: str,
    optimizer_class: type,
    *args,
    steps: int = 3,
    check_state: Optional[Callable[[rpc.RRef, DistributedOptimizer, torch.optim.Optimizer],
                                   None]] = None,
    **kwargs,
) -> DistributedOptimizer:
    """Trains a Linear on `owner` through a DistributedOptimizer and the same Linear locally,
    step by step; the inputs' gradients, the parameters' gradients and the parameters after
    each step must agree (and `check_state` on the optimizers' states, if given)."""
    module = rpc.remote(owner, f.linear, args=(7, 3, 2))
    params = rpc.rpc_sync(owner, f.param_rrefs, args=(module,))
    local = f.linear(7, 3, 2)
    initial = [p.detach().clone() for p in local.parameters()]
    local_opt = optimizer_class(local.parameters(), *args, **kwargs)
    opt = DistributedOptimizer(optimizer_class, params, *args, **kwargs)
    generator = torch.Generator().manual_seed(11)
    for _ in range(steps):
        x = torch.rand(5, 3, generator=generator).requires_grad_(True)
        with dist_autograd.context() as context_id:
            out = module.rpc_sync().forward(x)
            dist_autograd.backward(context_id, [(out * out).sum()])
            x_grad = dist_autograd.get_gradients(context_id)[x]
            remote_grads = rpc.rpc_sync(owner, f.grads_of, args=(module, context_id))
            opt.step(context_id)
        local_opt.zero_grad()
        xl = x.detach().clone().requires_grad_(True)
        (local(xl) ** 2).sum().backward()
        assert torch.allclose(x_grad, xl.grad, atol=1e-6)
        for remote_g, p in zip(remote_grads, local.parameters()):
            assert torch.allclose(remote_g, p.grad, atol=1e-6)
        local_opt.step()
        remote_params = rpc.rpc_sync(owner, f.params_of, args=(module,))
        assert len(remote_params) == 2
        for remote_p, p in zip(remote_params, local.parameters()):
            assert torch.allclose(remote_p, p.detach(), atol=1e-6)
        if check_state is not None:
            check_state(module, opt, local_opt)
    assert all(not torch.equal(p0, p) for p0, p in zip(initial, local.parameters()))
    return opt


def test_rpcs_made_by_a_backward_function_are_not_recorded_in_the_pass_context():
    (t,) = leaves((2,), seed=11)
    with dist_autograd.context() as context_id:
        loss = rpc.rpc_sync("worker1", f.rpc_in_backward, args=(t,)).sum()
        before = rpc.rpc_sync("worker1", f.known_and_recv, args=(context_id,))
        for _ in range(2):
            dist_autograd.backward(context_id, [loss], retain_graph=True)
        # The backward's own RPC added no send function to worker1's part of the context: the
        # second retain_graph pass did not wait for gradients that never come.
        assert rpc.rpc_sync("worker1", f.known_and_recv, args=(context_id,)) == before
        assert torch.equal(dist_autograd.get_gradients(context_id)[t], torch.full((2,), 2.0))


def test_no_local_records_are_left_after_release():
    t1, t2 = leaves((3,), (3,), seed=12)
    for _ in range(3):
        with dist_autograd.context() as context_id:
            val = rpc.rpc_sync("worker1", f.nested_add, args=("worker2", t1, t2))
            dist_autograd.backward(context_id, [val.sum()])
    for dst in ("worker0", "worker1", "worker2"):
        assert rpc.rpc_sync(dst, f.wait_no_local_records), dst


def test_rref_proxy_module_and_distributed_optimizer_match_local_training():
    opt = train_and_compare_with_local("worker1", torch.optim.SGD, lr=0.1, momentum=0.9)
    assert opt.is_functional_optim
    assert rpc.rpc_sync("worker1", f.owner_optimizer_class, args=(opt.remote_optimizers[0],)) \
        == "_FunctionalSGD"


def test_distributed_optimizer_positional_args():
    # DistributedOptimizer(optim.SGD, params, 0.05): positional arguments reach the constructor.
    opt = train_and_compare_with_local("worker2", torch.optim.SGD, 0.05, 0.5)
    assert opt.is_functional_optim


def test_distributed_optimizer_with_torchscript_disabled_takes_the_python_path(
        monkeypatch, caplog):
    # As PyTorch: with scripting disabled in the creating process, even an optimizer with a
    # functional form runs as itself (on .grad, under the lock), with the warning.
    monkeypatch.setattr(torch.jit._state._enabled, "enabled", False)
    assert not torch.jit._state._enabled
    with caplog.at_level(logging.WARNING, logger="tether.optim"):
        opt = train_and_compare_with_local("worker1", torch.optim.SGD, lr=0.1, momentum=0.9)
    assert not opt.is_functional_optim
    assert "without TorchScript support" in caplog.text
    assert rpc.rpc_sync("worker1", f.owner_optimizer_class, args=(opt.remote_optimizers[0],)) \
        == "SGD"
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tether.optim"):
        params = rpc.rpc_sync("worker1", f.param_rrefs,
                              args=(rpc.remote("worker1", f.linear, args=(7, 3, 2)),))
        assert DistributedOptimizer(torch.optim.SGD, params, lr=0.1).is_functional_optim
    assert "without TorchScript support" not in caplog.text


def _check_asgd_state(module: rpc.RRef, opt: DistributedOptimizer,
                      local_opt: torch.optim.Optimizer) -> None:
    remote_state = rpc.rpc_sync(module.owner(), f.asgd_state_of,
                                args=(module, opt.remote_optimizers[0]))
    for (eta, mu, ax), p in zip(remote_state, local_opt.param_groups[0]["params"]):
        local_state = local_opt.state[p]
        assert eta == pytest.approx(float(local_state["eta"]))
        assert mu == pytest.approx(float(local_state["mu"]))
        assert torch.allclose(ax, local_state["ax"], atol=1e-6)


@pytest.mark.parametrize("positional", [False, True])
def test_distributed_optimizer_asgd_matches_local_step_by_step(positional, caplog):
    # ASGD has no functional form: it runs as itself, with its own state (eta, mu and the
    # average ax, which starts moving once step > t0).
    with caplog.at_level(logging.WARNING, logger="tether.optim"):
        if positional:
            opt = train_and_compare_with_local("worker2", torch.optim.ASGD, 0.05, 1e-3, 0.75,
                                               1.0, steps=4, check_state=_check_asgd_state)
        else:
            opt = train_and_compare_with_local("worker2", torch.optim.ASGD, lr=0.05,
                                               lambd=1e-3, t0=1.0, steps=4,
                                               check_state=_check_asgd_state)
    assert not opt.is_functional_optim
    assert "without TorchScript support" in caplog.text


def test_distributed_optimizer_bad_context():
    module = rpc.remote("worker2", f.linear, args=(3, 2, 2))
    params = rpc.rpc_sync("worker2", f.param_rrefs, args=(module,))
    opt = DistributedOptimizer(torch.optim.ASGD, params, lr=0.05)
    with dist_autograd.context() as context_id:
        loss = module.rpc_sync().forward(torch.ones(1, 2)).sum()
        dist_autograd.backward(context_id, [loss])
    with pytest.raises(RuntimeError, match="Could not find autograd context with id"):
        opt.step(context_id)


def test_distributed_optimizer_error_texts():
    modules = [rpc.remote(owner, f.linear, args=(i, 3, 3)) for i, owner in
               enumerate(("worker1", "worker2"))]
    params = [p for m in modules for p in rpc.rpc_sync(m.owner(), f.param_rrefs, args=(m,))]
    with pytest.raises(ValueError, match="Error creating optimizer."):
        DistributedOptimizer(f.OptimizerFailingOnConstructor, params)
    opt = DistributedOptimizer(f.FailingOptimizer, params)
    before = [rpc.rpc_sync(m.owner(), f.params_of, args=(m,)) for m in modules]
    with dist_autograd.context() as context_id:
        t = torch.rand(2, 3, requires_grad=True)
        out = modules[1].rpc_sync().forward(modules[0].rpc_sync().forward(t))
        dist_autograd.backward(context_id, [out.sum()])
        with pytest.raises(ValueError, match="Error running optimizer"):
            opt.step(context_id)
    after = [rpc.rpc_sync(m.owner(), f.params_of, args=(m,)) for m in modules]
    for b, a in zip(before, after):
        assert all(torch.equal(x, y) for x, y in zip(b, a))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))
