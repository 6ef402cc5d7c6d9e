"""A fixed slice of PyTorch's own RPC tests, run against Tether by tools/torch-rpc-tests' runner.

Each test below passes on Tether today; the slice fails if any of them fails (or times out), so a
change that breaks what PyTorch's suite checks shows in `bazel test //...`. The whole suite, on
both backends, is `tools/torch-rpc-tests` (hours on two cores). The table of this run is written
to $TEST_UNDECLARED_OUTPUTS_DIR/torch_rpc_slice.md.
"""
import os
import sys
import tempfile
import time

from testing.torch_rpc import runner

# Python UDFs, builtins, async_execution, remote() and RRefs, worker infos, nested calls;
SLICE = [
    "RpcTest.test_add",
    "RpcTest.test_async_add",
    "RpcTest.test_async_function_simple",
    "RpcTest.test_builtin_remote_ret",
    "RpcTest.test_get_worker_infos",
    "RpcTest.test_local_rref_no_fork",
    "RpcTest.test_multi_builtin_remote_ret",
    "RpcTest.test_multi_rpc",
    "RpcTest.test_nested_rpc",
    # The FAULTY_TENSORPIPE backend: retried RRef messages whose sends fail, delayed calls.
    "FaultyAgentRpcTest.test_check_failed_messages",
    "FaultyAgentRpcTest.test_rpc_builtin_timeout",
]


def main() -> int:
    out_dir = os.environ.get("TEST_UNDECLARED_OUTPUTS_DIR") or tempfile.mkdtemp()
    start = time.monotonic()
    code = runner.main([
        "--class", "RpcTest,FaultyAgentRpcTest",
        "--tests", ",".join(SLICE),
        "--backend", "tether",
        "--timeout", os.environ.get("TORCH_RPC_SLICE_TIMEOUT", "150"),
        "--out", os.path.join(out_dir, "torch_rpc_slice.md"),
        "--check",
    ])
    print(f"slice of {len(SLICE)} tests: {time.monotonic() - start:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
