"""RRefs inside RRef values, chains of RRefs through remote() results, and the RRef methods
PyTorch's own tests use (_get_type, _get_profiling_future / _set_profiling_future, _serialize /
_deserialize, PyTorch's repr), checked as PyTorch's rpc_test.py checks them. The test process is
worker0 of a group of three; worker1 and worker2 are spawned processes."""
import os
import sys
import time

import pytest
import torch
from torch.autograd.profiler_legacy import profile as legacy_profile

import tether.rpc as rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import rpc_funcs as f  # noqa: E402
import rref_funcs as rf  # noqa: E402

WORLD = 3


@pytest.fixture(scope="module", autouse=True)
def group():
    yield from harness.group(WORLD)


def wait_for(predicate, what, timeout_s=60):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def owner_count(worker):
    return rpc.rpc_sync(worker, rf.owner_rref_count)


# --- RRefs inside values ------------------------------------------------------------------------

def test_to_here_of_a_value_holding_rrefs_of_a_third_worker():
    before1, before2 = owner_count("worker1"), owner_count("worker2")
    outer = rpc.remote("worker1", rf.remote_pair, args=("worker2", torch.ones(2)))
    a, b = outer.to_here()  # worker1's user RRefs, forked for us
    assert not a.is_owner() and a.owner_name() == "worker2" and b.owner_name() == "worker2"
    assert torch.equal(a.to_here(), torch.ones(2) + 1)
    assert torch.equal(b.to_here(), torch.ones(2) + 2)
    # Each fetch forks again.
    a2, _ = outer.to_here()
    assert torch.equal(a2.to_here(), torch.ones(2) + 1)
    # Fork semantics: our forks keep worker2's values alive once worker1's own references are
    # gone (the outer value freed with its last user).
    del outer, _
    wait_for(lambda: owner_count("worker1") == before1, "worker1 kept the outer value")
    assert owner_count("worker2") == before2 + 2
    assert torch.equal(a.to_here(), torch.ones(2) + 1)
    assert torch.equal(b.to_here(), torch.ones(2) + 2)
    # ... and nothing leaks once ours go too.
    del a, a2, b
    wait_for(lambda: owner_count("worker2") == before2, "worker2 kept values nobody reaches")


def test_to_here_of_a_value_holding_rrefs_of_the_fetcher_and_of_the_owner():
    mine = rpc.RRef(torch.full((2,), 5.0))
    outer = rpc.remote("worker1", f.echo, args=([mine, 3],))
    (back, three) = outer.to_here()
    assert three == 3 and back.is_owner()  # our own value comes back as an owner RRef
    assert torch.equal(back.local_value(), torch.full((2,), 5.0))
    # RRefs the owner of the outer value owns: user RRefs here.
    listed = rpc.remote("worker1", rf.local_rrefs, args=([1, 2, 3],))
    rrefs = listed.to_here()
    assert [r.owner_name() for r in rrefs] == ["worker1"] * 3
    assert [r.to_here() for r in rrefs] == [1, 2, 3]
    # They travel on (user to user) and are usable where they land.
    assert rpc.rpc_sync("worker2", f.rref_to_here, args=(rrefs[1],)) == 2
    assert rpc.rpc_sync("worker1", f.rref_local_plus, args=(rrefs[2], 10)) == 13


def test_rref_forward_chain_through_remote_results():
    ttl = 5
    rref = rpc.remote("worker1", torch.add, args=(torch.ones(2, 2), 1))
    ret = rf.forward_chain(1, WORLD, rref, ttl)
    for _ in range(ttl):
        assert len(ret) == 1
        ret = ret[0].to_here()
    assert ret[0] is not None and torch.equal(ret[0].to_here(), torch.ones(2, 2) + 1)


def test_rref_returned_by_rpc_and_nested_remote_results():
    # A remote() whose function returns RRefs made by remote(): PyTorch's nested_rref.
    outer = rpc.remote("worker1", rf.remote_pair, args=("worker0", torch.zeros(1)))
    x, y = outer.to_here()
    assert x.is_owner() and y.is_owner()  # owned here: no fork from worker1 to itself
    assert torch.equal(x.to_here(), torch.ones(1))
    assert torch.equal(y.local_value(), torch.full((1,), 2.0))


# --- _get_type ------------------------------------------------------------------------------------

def _asked_owner(events):
    return any(e.name.startswith("rpc_async#_rref_typeof_on_owner") for e in events)


@pytest.mark.parametrize("blocking", [True, False])
def test_get_type_asks_the_owner_once(blocking):
    rref = rpc.remote("worker1", torch.add, args=(torch.ones(2), 1))
    with legacy_profile() as p:
        t = rref._get_type(blocking=blocking)
        if not blocking:
            t = t.wait()
    assert t is torch.Tensor
    assert _asked_owner(p.function_events)
    futs = []
    with legacy_profile() as p:
        for _ in range(5):
            t = rref._get_type(blocking=blocking)
            if not blocking:
                futs.append(t)
                t = t.wait()
            assert t is torch.Tensor
    assert not _asked_owner(p.function_events)
    if not blocking:
        assert all(fut is futs[0] for fut in futs)
    t = rpc.remote("worker2", f.make_counter, args=(0,))._get_type(blocking=blocking)
    assert (t if blocking else t.wait()) is f.Counter


def test_get_type_on_the_owner_and_from_a_third_worker():
    assert rpc.RRef(f.Counter(1))._get_type() is f.Counter
    fut = rpc.RRef([1])._get_type(blocking=False)
    assert isinstance(fut, torch.futures.Future) and fut.wait() is list
    rref = rpc.remote("worker1", f.make_counter, args=(2,))
    assert rpc.rpc_sync("worker2", rf.type_of_rref_value, args=(rref,)) is f.Counter


def test_get_type_errors():
    failed = rpc.remote("worker1", f.raise_value_error)
    with pytest.raises(ValueError, match="Expected error"):
        failed._get_type()
    with pytest.raises(ValueError, match="Expected error"):
        failed._get_type(blocking=False).wait()
    slow = rpc.remote("worker1", rf.SlowInit, args=(5,))
    with pytest.raises(RuntimeError, match="RPC ran for more than"):
        slow._get_type(timeout=0.3)
    with pytest.raises(RuntimeError, match="RPC ran for more than"):
        slow._get_type(timeout=0.3, blocking=False).wait()
    # A failed ask is not remembered.
    assert slow._get_type(timeout=30) is rf.SlowInit


# --- repr, local_value's error --------------------------------------------------------------------

def test_repr_in_pytorch_format_from_a_fresh_start():
    # Fresh workers: ids count from 0 on each, as in PyTorch.
    results = harness.run_group(rf.repr_target, 2)
    assert results == {0: "ok", 1: "ok"}


# --- profiling futures ----------------------------------------------------------------------------

def test_profiling_future():
    rref = rpc.RRef(1)
    with pytest.raises(RuntimeError, match="Profiling future has not been set!"):
        rref._get_profiling_future()
    fut = torch.futures.Future()
    rref._set_profiling_future(fut)
    assert rref._get_profiling_future() is fut
    with pytest.raises(TypeError):
        rref._set_profiling_future(3)
    with legacy_profile() as p:
        remote = rpc.remote("worker1", torch.add, args=(torch.ones(1), 1))
        remote.to_here()
        remote._get_profiling_future().wait()
    assert any(e.name.startswith("rpc_remote#") for e in p.function_events)


# --- _serialize / _deserialize --------------------------------------------------------------------

def test_serialize_deserialize_in_a_custom_reducer():
    mine = rf.Holder(rpc.RRef(torch.ones(2)), "mine")
    tag, value = rpc.rpc_sync("worker1", rf.holder_value, args=(mine,))
    assert tag == "mine" and torch.equal(value, torch.ones(2))
    theirs = rf.Holder(rpc.remote("worker2", rf.ones_plus, args=(3,)), "theirs")
    tag, value = rpc.rpc_sync("worker1", rf.holder_value, args=(theirs,))
    assert tag == "theirs" and torch.equal(value, torch.ones(2) + 3)
    back = rpc.rpc_sync("worker1", rf.holder_roundtrip, args=(theirs,))
    assert back.rref.owner_name() == "worker2"
    assert torch.equal(back.rref.to_here(), torch.ones(2) + 3)
    made = rpc.rpc_sync("worker2", rf.make_holder, args=(7, "made"))
    assert made.tag == "made" and made.rref.owner_name() == "worker2" and made.rref.to_here() == 7
    with pytest.raises(RuntimeError, match="Can not pickle rref in python pickler"):
        mine.rref._serialize()  # only while pickling for an RPC


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))
