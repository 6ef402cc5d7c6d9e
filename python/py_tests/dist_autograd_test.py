"""tether.autograd and tether.optim across three workers, checked the way PyTorch's
dist_autograd and dist_optimizer tests check them: gradients equal local autograd's, graphs have
the send and receive functions PyTorch records, errors carry PyTorch's texts, contexts are released
everywhere. The test process is worker0; worker1 and worker2 are spawned processes."""
import os
import sys

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
        rpc.rpc_sync("worker1", f.set_backward_failure, args=(False,))
        for _ in range(2):
            dist_autograd.backward(context_id, [loss], retain_graph=True)
        assert dist_autograd.get_gradients(context_id)[t1].shape == (3,)


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
    module = rpc.remote("worker1", f.linear, args=(7, 3, 2))
    params = rpc.rpc_sync("worker1", f.param_rrefs, args=(module,))
    local = f.linear(7, 3, 2)
    local_opt = torch.optim.SGD(local.parameters(), lr=0.1, momentum=0.9)
    opt = DistributedOptimizer(torch.optim.SGD, params, lr=0.1, momentum=0.9)
    assert opt.is_functional_optim
    torch.manual_seed(11)
    for _ in range(3):
        x = torch.rand(5, 3, requires_grad=True)
        with dist_autograd.context() as context_id:
            out = module.rpc_sync().forward(x)
            loss = (out * out).sum()
            dist_autograd.backward(context_id, [loss])
            x_grad = dist_autograd.get_gradients(context_id)[x]
            remote_grads = rpc.rpc_sync("worker1", f.grads_of, args=(module, context_id))
            opt.step(context_id)
        local_opt.zero_grad()
        xl = x.detach().clone().requires_grad_(True)
        (local(xl) ** 2).sum().backward()
        assert torch.allclose(x_grad, xl.grad, atol=1e-6)
        for remote_g, p in zip(remote_grads, local.parameters()):
            assert torch.allclose(remote_g, p.grad, atol=1e-6)
        local_opt.step()
        for remote_p, p in zip(rpc.rpc_sync("worker1", f.params_of, args=(module,)),
                               local.parameters()):
            assert torch.allclose(remote_p, p.detach(), atol=1e-6)


def test_distributed_optimizer_with_a_non_functional_class_and_bad_context():
    module = rpc.remote("worker2", f.linear, args=(3, 2, 2))
    params = rpc.rpc_sync("worker2", f.param_rrefs, args=(module,))

    opt = DistributedOptimizer(torch.optim.ASGD, params, lr=0.05)
    assert not opt.is_functional_optim
    before = rpc.rpc_sync("worker2", f.params_of, args=(module,))
    with dist_autograd.context() as context_id:
        loss = module.rpc_sync().forward(torch.ones(1, 2)).sum()
        dist_autograd.backward(context_id, [loss])
        opt.step(context_id)
    after = rpc.rpc_sync("worker2", f.params_of, args=(module,))
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(RuntimeError, match="Could not find autograd context with id"):
        opt.step(context_id)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))
