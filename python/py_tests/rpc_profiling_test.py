"""RPCs in PyTorch's legacy autograd profiler (caller events and the callee's operators as remote
events) and the server-process profiler, checked as PyTorch's RPC profiler tests check them.
The test process is worker0 of a group of three; worker1 and worker2 are spawned processes."""
import os
import sys

import pytest
import torch
from torch.autograd.profiler_legacy import profile

import tether.rpc as rpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import rpc_funcs as f  # noqa: E402

WORLD = 3
REMOTE_OP = "#remote_op: "


@pytest.fixture(scope="module", autouse=True)
def group():
    yield from harness.group(WORLD)


def remote_ops(events, key):
    """{operator: event} of the remote events recorded for the call named `key`."""
    out = {}
    for e in events:
        if e.name.startswith(key + REMOTE_OP):
            out[e.name[len(key + REMOTE_OP):]] = e
    return out


def the_event(events, name):
    found = [e for e in events if e.name == name]
    assert len(found) == 1, (name, sorted({e.name for e in events}))
    return found[0]


def test_callee_operators_come_back_as_remote_events():
    t = torch.ones(3)
    with profile() as prof:
        rpc.rpc_sync("worker1", f.torch_ops, args=(t,))
        rpc.rpc_async("worker2", torch.add, args=(t, 1)).wait()
        rpc.remote("worker1", f.torch_ops, args=(t,)).to_here()
        # Waiting for the creation instead of the value brings the operators in too.
        rpc.remote("worker2", f.torch_ops, args=(t,))._get_future().wait()
    events = prof.function_events
    for key, dst, ops in (
            ("rpc_sync#torch_ops(worker0 -> worker1)", 1, {"aten::add", "aten::mul"}),
            ("rpc_async#aten::add(worker0 -> worker2)", 2, {"aten::add"}),
            ("rpc_remote#torch_ops(worker0 -> worker1)", 1, {"aten::add", "aten::mul"}),
            ("rpc_remote#torch_ops(worker0 -> worker2)", 2, {"aten::add", "aten::mul"})):
        rpc_event = the_event(events, key)
        assert rpc_event.node_id == 0 and not rpc_event.is_remote
        remote = remote_ops(events, key)
        assert ops <= set(remote), (key, sorted(remote))
        for e in remote.values():
            assert e.node_id == dst and e.is_remote, (e.name, e.node_id)
    # The caller itself never ran aten::mul: only the callee's reports name it.
    assert not any(e.name == "aten::mul" for e in events)


def test_torchscript_and_self_calls_are_profiled_too():
    t = torch.ones(2)
    with profile() as prof:
        rpc.rpc_sync("worker2", f.script_add, args=(t, 3))
        rpc.rpc_sync("worker0", f.torch_ops, args=(t,))
    events = prof.function_events
    key = [e.name for e in events if e.name.startswith("rpc_sync#")
           and e.name.endswith("script_add(worker0 -> worker2)")]
    assert len(key) == 1, sorted(e.name for e in events)
    assert "aten::add" in remote_ops(events, key[0]), sorted(e.name for e in events)
    own = remote_ops(events, "rpc_sync#torch_ops(worker0 -> worker0)")
    assert {"aten::add", "aten::mul"} <= set(own)
    assert all(e.node_id == 0 and e.is_remote for e in own.values())


def test_a_call_waiting_for_its_rref_arguments_is_profiled_when_it_runs():
    rref = rpc.remote("worker2", f.echo, args=(torch.ones(2),))
    with profile() as prof:
        rpc.rpc_sync("worker1", f.torch_ops_with_rref, args=(rref, torch.ones(2)))
    ops = remote_ops(prof.function_events, "rpc_sync#torch_ops_with_rref(worker0 -> worker1)")
    assert {"aten::add", "aten::mul"} <= set(ops), sorted(ops)


def test_async_execution_and_record_shapes():
    t = torch.ones(4)
    with profile(record_shapes=True) as prof:
        fut = rpc.rpc_async("worker1", f.async_add_chained, args=("worker2", t, 1, 1))
        assert torch.equal(fut.wait(), t + 2)
        rpc.rpc_sync("worker1", f.torch_ops, args=(t,))
    events = prof.function_events
    the_event(events, "rpc_async#async_add_chained(worker0 -> worker1)")
    ops = remote_ops(events, "rpc_sync#torch_ops(worker0 -> worker1)")
    assert "aten::add" in ops, sorted(e.name for e in events)
    add = ops["aten::add"]
    assert add.input_shapes and add.input_shapes[0] == [4], add.input_shapes


def test_kineto_profiler_records_the_caller_event():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        rpc.rpc_sync("worker1", f.torch_ops, args=(torch.ones(2),))
    names = {e.name for e in prof.events()}
    assert "rpc_sync#torch_ops(worker0 -> worker1)" in names, sorted(names)


def test_callee_profiles_only_while_asked():
    with profile():
        assert rpc.rpc_sync("worker1", f.profiler_enabled) is True
    # The callee's threads are back to normal once the profiled call is answered.
    for _ in range(8):  # every thread of worker1's pool of 4
        assert rpc.rpc_sync("worker1", f.profiler_enabled) is False
    with profile() as prof:
        pass
    assert not [e for e in prof.function_events if REMOTE_OP in e.name]


def test_server_process_profiler_sees_requests_handled_here():
    t = torch.ones(2)
    with rpc._server_process_global_profile() as prof:
        rpc.rpc_sync("worker0", f.torch_ops, args=(t,))  # handled by this worker's RPC threads
        rpc.rpc_sync("worker0", torch.sub, args=(t, 1))
    names = {e.name for e in prof.function_events}
    assert {"aten::add", "aten::mul", "aten::sub"} <= names, sorted(names)
    assert len(prof.process_global_function_events) == 2
    assert "aten::sub" in prof.key_averages().table()


def test_server_process_profiler_driven_remotely_and_nested():
    x, y = torch.tensor(1), torch.tensor(2)
    outer = rpc.remote("worker1", rpc._server_process_global_profile)
    outer.rpc_sync().__enter__()
    rpc.rpc_sync("worker1", torch.add, args=(x, y))
    inner = rpc.remote("worker1", rpc._server_process_global_profile)
    inner.rpc_sync().__enter__()
    rpc.rpc_sync("worker1", torch.sub, args=(x, y))
    inner.rpc_sync().__exit__(None, None, None)
    outer.rpc_sync().__exit__(None, None, None)
    inner_names = {e.name for e in inner.to_here().function_events}
    outer_names = {e.name for e in outer.to_here().function_events}
    assert "aten::sub" in inner_names and "aten::add" not in inner_names, sorted(inner_names)
    assert {"aten::add", "aten::sub"} <= outer_names, sorted(outer_names)


def test_disabling_a_server_profiler_that_is_off_is_an_error():
    with pytest.raises(RuntimeError, match="server-process profiler is not enabled"):
        rpc._disable_server_process_global_profiler()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v", "-p", "no:cacheprovider"]))
