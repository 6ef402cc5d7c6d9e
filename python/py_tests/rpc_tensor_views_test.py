"""Tensor views over tether.rpc, as PyTorch's RPC delivers them (checked against PyTorch 1.13.1):
a tensor keeps its sizes, strides and storage offset; tensors sharing a storage in one message
share one on arrival (the storage travels once); a tensor whose storage is at least 8 KiB and at
least twice its numel * itemsize is sent as a compact clone. The test process is worker0 of a
group of two; worker1 is a spawned process."""
import os
import sys

import pytest
import torch

import tether.rpc as rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import tensor_view_funcs as f  # noqa: E402

WORLD = 2


@pytest.fixture(scope="module", autouse=True)
def group():
    yield from harness.group(WORLD)


def layout(*tensors):
    return f.layout(*tensors)


def shares(a, b):
    return a.storage().data_ptr() == b.storage().data_ptr()


def view_cases():
    a = torch.arange(100.0)
    return {
        "slice": (a[2:5],),
        "transposed": (torch.arange(12.0).reshape(3, 4).t(),),
        "non_contiguous": (a.reshape(10, 10).t()[2:5],),
        "expanded": (torch.ones(1).expand(5000),),
        "zero_dim": (a[3],),
        "zero_size": (a[5:5],),
        "two_views": (a, a[1:].view(9, 11)[:, ::2]),
    }


@pytest.mark.parametrize("case", sorted(view_cases()))
def test_views_keep_layout_on_callee_and_reply(case):
    args = view_cases()[case]
    want = layout(*args)
    assert rpc.rpc_sync("worker1", f.layout, args=args) == want
    assert rpc.rpc_async("worker1", f.layout, args=args).wait() == want
    assert rpc.remote("worker1", f.layout, args=args).to_here() == want
    for back in (rpc.rpc_sync("worker1", f.echo, args=args),
                 rpc.rpc_async("worker1", f.echo, args=args).wait(),
                 rpc.remote("worker1", f.echo, args=args).to_here()):
        assert layout(*back) == want
        for got, sent in zip(back, args):
            assert torch.equal(got, sent)


def test_two_views_of_one_storage_share_it_on_arrival():
    a = torch.arange(10.0)
    value, (pa, pb) = rpc.rpc_sync("worker1", f.write_through, args=(a, a[1:]))
    assert value == 100.0 and pa == pb, "a write through a[1:] on the callee is seen through a"
    assert a[1].item() == 1.0, "the caller's tensor is not the callee's"
    for back in (rpc.rpc_sync("worker1", f.echo, args=(a, a[1:])),
                 rpc.rpc_async("worker1", f.echo, args=(a, a[1:])).wait(),
                 rpc.remote("worker1", f.echo, args=(a, a[1:])).to_here()):
        x, y = back
        assert shares(x, y) and layout(x, y) == layout(a, a[1:])
        y[0] = -1.0
        assert x[1].item() == -1.0
    # A call to oneself: the views share one copy, never the caller's storage.
    value, (pa, pb) = rpc.rpc_sync("worker0", f.write_through, args=(a, a[1:]))
    assert value == 100.0 and pa == pb and a[1].item() == 1.0


def test_small_slice_of_big_tensor_is_compacted_as_in_pytorch():
    big = torch.arange(1_000_000, dtype=torch.float32)
    sent = (big[10:20], big.view(1000, 1000)[:2].t(), big.view(1000, 1000)[:, :2], big[1:600001])
    want = [
        ((10,), (1,), 0, 40),              # compacted
        ((1000, 2), (1, 1000), 0, 8000),   # compacted, dense: strides kept
        ((1000, 2), (2, 1), 0, 8000),      # compacted, not dense: contiguous
        ((600000,), (1,), 1, 4_000_000),   # more than half of the storage: whole
    ]
    assert rpc.rpc_sync("worker1", f.layout, args=sent) == want
    assert rpc.remote("worker1", f.layout, args=sent).to_here() == want
    back = rpc.rpc_sync("worker1", f.views_of_big)
    assert layout(*back) == [want[0], want[1], want[3]]
    assert not shares(back[0], back[2]) and torch.equal(back[0], big[10:20])
    small = torch.zeros(2047)  # 8188 bytes: under 8 KiB, shipped whole
    assert rpc.rpc_sync("worker1", f.layout, args=(small[5:6],)) == [((1,), (1,), 5, 8188)]


def test_builtin_and_torchscript_calls_keep_views():
    x = torch.arange(12.0).reshape(3, 4)
    out = rpc.rpc_sync("worker1", torch.narrow, args=(x.t(), 0, 1, 2))
    assert layout(out) == [((2, 3), (1, 4), 1, 48)] and torch.equal(out, x.t()[1:3])
    out = rpc.rpc_async("worker1", torch.narrow, args=(x.t(), 0, 1, 2)).wait()
    assert layout(out) == [((2, 3), (1, 4), 1, 48)]
    out = rpc.remote("worker1", torch.narrow, args=(x.t(), 0, 1, 2)).to_here()
    assert layout(out) == [((2, 3), (1, 4), 1, 48)]
    assert rpc.rpc_sync("worker1", f.script_layout, args=(x.t()[1:],)) == [1, 4, 1]
    a = torch.arange(10.0)
    for y, z in (rpc.rpc_sync("worker1", f.script_views, args=(a[2:],)),
                 rpc.remote("worker1", f.script_views, args=(a[2:],)).to_here()):
        assert shares(y, z) and layout(y, z) == layout(a[2:], a[3:])


def test_views_of_tensors_that_require_grad():
    a = torch.arange(10.0, requires_grad=True)
    with torch.no_grad():
        view = a.view(2, 5).t()
    back = rpc.rpc_sync("worker1", f.echo, args=(a, a.view(2, 5).t()))
    assert back[0].requires_grad and back[1].requires_grad
    assert layout(*back) == layout(a, view)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))


def test_sparse_coo_tensors_travel_both_ways():
    indices = torch.tensor([[0, 1, 1], [2, 0, 0]])  # two entries at (1, 0)
    sparse = torch.sparse_coo_tensor(indices, torch.tensor([3.0, 4.0, 5.0]), (2, 3))
    hybrid = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.ones(2, 4), (3, 4))
    for t in (sparse, sparse.coalesce(), hybrid):
        for (got,) in (rpc.rpc_sync("worker1", f.echo, args=(t,)),
                       rpc.rpc_async("worker1", f.echo, args=(t,)).wait(),
                       rpc.remote("worker1", f.echo, args=(t,)).to_here()):
            assert got.is_sparse and got.is_coalesced() == t.is_coalesced()
            assert (got.sparse_dim(), got.dense_dim()) == (t.sparse_dim(), t.dense_dim())
            assert torch.equal(got._indices(), t._indices())
            assert torch.equal(got.to_dense(), t.to_dense())
        summed = rpc.rpc_sync("worker1", torch.add, args=(t, t))  # a builtin operator call
        assert summed.is_sparse and torch.equal(summed.to_dense(), 2 * t.to_dense())
