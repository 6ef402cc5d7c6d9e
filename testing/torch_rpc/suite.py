"""PyTorch's RPC test classes, made runnable the way PyTorch's own test files make them.

PyTorch's test files (test/distributed/rpc/test_tensorpipe_agent.py, test_faulty_agent.py) mix
each generic test class with an agent fixture and a MultiProcessTestCase that spawns the workers
(torch/testing/_internal/distributed/rpc_utils.py, `generate_tests`). This module does the same
for one class at a time, lazily (module `__getattr__`), so a class whose PyTorch module cannot be
imported on a backend fails alone: `suite.RpcTest` is PyTorch's RpcTest + the TensorPipe fixture
+ a spawning MultiProcessTestCase.

The backend is chosen by $TORCH_RPC_TESTS_BACKEND ("tether" or "torch", default torch) at import:
with "tether", Tether's modules are served under PyTorch's names (aliases.py) before any of
PyTorch's test modules is imported. The spawned workers inherit the variable and import this
module again when they unpickle their test class, so they get the same modules.
"""
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

BACKEND_ENV = "TORCH_RPC_TESTS_BACKEND"
PLACEHOLDERS_ENV = "TORCH_RPC_TESTS_PLACEHOLDERS"
BACKEND = os.environ.get(BACKEND_ENV, "torch")
if BACKEND not in ("tether", "torch"):
    raise ValueError(f"${BACKEND_ENV} must be tether or torch, not {BACKEND!r}")

if BACKEND == "tether":
    from testing.torch_rpc.aliases import install_tether_aliases

    install_tether_aliases(placeholders=os.environ.get(PLACEHOLDERS_ENV, "1") == "1")

_RPC = "torch.testing._internal.distributed.rpc."


@dataclass(frozen=True)
class ClassSpec:
    module: str  # PyTorch's module holding the test class
    fixture: Tuple[str, str]  # (module, class) of the agent fixture PyTorch mixes in
    gpu_only: bool = False  # every test of the class needs CUDA GPUs


_TENSORPIPE = (_RPC + "tensorpipe_rpc_agent_test_fixture", "TensorPipeRpcAgentTestFixture")
_FAULTY = (_RPC + "faulty_rpc_agent_test_fixture", "FaultyRpcAgentTestFixture")

# As rpc_utils.py pairs them: GENERIC_* with every agent (here: TensorPipe's), TENSORPIPE_* with
# the TensorPipe fixture, FAULTY_AGENT_TESTS with the faulty one.
CLASSES: Dict[str, ClassSpec] = {
    "RpcTest": ClassSpec(_RPC + "rpc_test", _TENSORPIPE),
    "TensorPipeAgentRpcTest": ClassSpec(_RPC + "rpc_test", _TENSORPIPE),
    "FaultyAgentRpcTest": ClassSpec(_RPC + "faulty_agent_rpc_test", _FAULTY),
    "DistAutogradTest": ClassSpec(_RPC + "dist_autograd_test", _TENSORPIPE),
    "TensorPipeAgentDistAutogradTest": ClassSpec(_RPC + "dist_autograd_test", _TENSORPIPE),
    "FaultyAgentDistAutogradTest": ClassSpec(_RPC + "dist_autograd_test", _FAULTY),
    "DistOptimizerTest": ClassSpec(_RPC + "dist_optimizer_test", _TENSORPIPE),
    "CudaRpcTest": ClassSpec(_RPC + "rpc_test", _TENSORPIPE, gpu_only=True),
    "TensorPipeAgentCudaRpcTest": ClassSpec(_RPC + "rpc_test", _TENSORPIPE, gpu_only=True),
    "CudaDistAutogradTest": ClassSpec(_RPC + "dist_autograd_test", _TENSORPIPE, gpu_only=True),
    "TensorPipeCudaDistAutogradTest": ClassSpec(
        _RPC + "dist_autograd_test", _TENSORPIPE, gpu_only=True
    ),
}


def _spawn_helper() -> type:
    from torch.testing._internal.common_distributed import MultiProcessTestCase

    class SpawnWorkers(MultiProcessTestCase):
        """Spawns the workers in setUp, as PyTorch's RPC test files do."""

        def setUp(self) -> None:
            super().setUp()
            self._spawn_processes()

    return SpawnWorkers


def original_class(name: str) -> type:
    """PyTorch's own test class (not mixed with a fixture)."""
    spec = CLASSES[name]
    return getattr(importlib.import_module(spec.module), name)


def build_class(name: str) -> type:
    spec = CLASSES[name]
    tests = original_class(name)
    fixture_module, fixture_name = spec.fixture
    fixture = getattr(importlib.import_module(fixture_module), fixture_name)
    cls = type(name, (tests, fixture, _spawn_helper()), {})
    cls.__module__ = __name__
    cls.__qualname__ = name
    return cls


def __getattr__(name: str) -> Any:
    if name not in CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = build_class(name)
    globals()[name] = cls  # pickling the workers' target checks that the name gives this class
    return cls


def test_names(name: str) -> List[str]:
    """The class's tests in unittest's order (sorted by name): the order slices index."""
    import unittest

    return list(unittest.TestLoader().getTestCaseNames(original_class(name)))


def backend_module_name() -> str:
    return sys.modules["torch.distributed.rpc"].__name__
