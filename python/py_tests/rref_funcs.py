"""Functions and classes rpc_rref_test.py runs on other workers (by reference, so every worker
imports this module): RRefs inside values, chains of RRefs through remote() results, and an
object that carries an RRef through RRef._serialize() / RRef._deserialize()."""
import time

import torch

import tether.rpc as rpc
from tether.rpc import internal


def add(a, b):
    return a + b


def remote_pair(owner, x):
    """Two RRefs owned by `owner`, made here: the value of a remote() that holds RRefs."""
    return (rpc.remote(owner, add, args=(x, 1)), rpc.remote(owner, add, args=(x, 2)))


def local_rrefs(values):
    """RRefs owned here, one per value."""
    return [rpc.RRef(v) for v in values]


def forward_chain(to_rank, world_size, rref, ttl):
    """ttl hops of remote() calls, each returning [an RRef to the next hop's result]; the last
    hop returns [rref]: unwinding it needs ttl to_here() calls, each fetching an RRef held by
    another worker (PyTorch's rref_forward_chain)."""
    if ttl > 0:
        nxt = (to_rank + 1) % world_size
        ret = rpc.remote(rpc.get_worker_info(to_rank), forward_chain,
                         args=(nxt, world_size, rref, ttl - 1))
        return [ret]
    return [rref]


def owner_rref_count():
    return int(rpc._rref_context_get_debug_info()["num_owner_rrefs"])


def is_owner_and_value(rref):
    return rref.is_owner(), rref.local_value() if rref.is_owner() else rref.to_here()


def type_of_rref_value(rref):
    return rref._get_type()


class SlowInit:
    def __init__(self, seconds):
        time.sleep(seconds)


class Holder:
    """Travels over RPC with its RRef through RRef._serialize() / RRef._deserialize(), as
    torch.distributed.nn's RemoteModule does with its module RRef."""

    def __init__(self, rref, tag):
        self.rref = rref
        self.tag = tag


def _holder_receiver(fields, tag):
    return Holder(rpc.RRef._deserialize(fields), tag)


def _holder_reducer(holder):
    return (_holder_receiver, (holder.rref._serialize(), holder.tag))


# Registered with the RPC pickler only (a plain pickle of a Holder fails as an RRef's does).
internal._dispatch_table[Holder] = _holder_reducer


def holder_value(holder):
    return holder.tag, holder.rref.to_here()


def holder_roundtrip(holder):
    return holder


def make_holder(value, tag):
    return Holder(rpc.RRef(value), tag)


def ones_plus(n):
    return torch.ones(2) + n


def repr_target(rank, world_size, init_method):
    """A fresh worker (harness.run_group): its first ids are 0, 1, 2, as PyTorch's are, and the
    repr and local_value()'s error say them in PyTorch's words."""
    import re

    import harness

    rpc.init_rpc(harness.worker_name(rank), rank=rank, world_size=world_size,
                 rpc_backend_options=harness.options(init_method))
    try:
        mine = rpc.RRef(rank)
        expected = f"OwnerRRef(GloballyUniqueId(created_on={rank}, local_id=0))"
        assert str(mine) == expected and repr(mine) == expected, str(mine)
        other = (rank + 1) % world_size
        theirs = rpc.remote(harness.worker_name(other), ones_plus, args=(rank,))
        expected = (f"UserRRef(RRefId = GloballyUniqueId(created_on={rank}, local_id=1), "
                    f"ForkId = GloballyUniqueId(created_on={rank}, local_id=2))")
        assert str(theirs) == expected and repr(theirs) == expected, str(theirs)
        message = (
            f"For UserRRef(rref_id=GloballyUniqueId(created_on={rank}, local_id=1), "
            f"fork_id=GloballyUniqueId(created_on={rank}, local_id=2)), can't call localValue() "
            f"on user WorkerInfo(id={rank}, name=worker{rank}). "
            f"Call it on owner WorkerInfo(id={other}, name=worker{other})"
        )
        try:
            theirs.local_value()
            raise AssertionError("local_value() on a user RRef did not raise")
        except RuntimeError as e:
            assert re.fullmatch(re.escape(message), str(e)), str(e)
        assert torch.equal(theirs.to_here(), torch.ones(2) + rank)
    finally:
        rpc.shutdown()
    return "ok"
