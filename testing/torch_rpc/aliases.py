"""Serve Tether's modules under PyTorch's names, as a user porting a program would.

After `install_tether_aliases()`:
- `torch.distributed.rpc` is `tether.rpc`, and `torch.distributed.rpc.X` is `tether.rpc.X` for
  every submodule Tether has (api, backend_registry, constants, functions, internal, options,
  server_process_global_profiler, ...). A submodule Tether lacks (`_testing`, `_utils`, ...)
  fails to import with a ModuleNotFoundError that says so.
- `torch.distributed.autograd` is `tether.autograd`.
- `torch.distributed.optim.DistributedOptimizer` is `tether.optim.DistributedOptimizer` (the rest
  of torch.distributed.optim stays PyTorch's: Tether has only the distributed optimizer).

With `placeholders=True`, a name that PyTorch's test modules import from those modules and Tether
lacks (`from torch.distributed.rpc.api import _use_rpc_pickler`) is set on Tether's module as a
placeholder that raises NotImplementedError, naming it, on any use (call, attribute, `with`, ...):
the test module then imports, and only the tests that use the name fail. Without it, the whole
test module fails to import, as it would for a user. A missing *module* (`_testing`) always fails
its import.

`import torch` already imports PyTorch's own torch.distributed.rpc and autograd; their entries in
sys.modules are replaced, so every later import sees Tether's. Modules that bound PyTorch's before
(torch.nn.parallel and the like) keep it; none of the RPC tests go through them.
"""
import ast
import glob
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any, Dict, List, Optional, Sequence, Tuple

# PyTorch's package name -> Tether's.
PACKAGES: Dict[str, str] = {
    "torch.distributed.rpc": "tether.rpc",
    "torch.distributed.autograd": "tether.autograd",
}

_installed = False


def _counterpart(fullname: str) -> Optional[str]:
    for torch_name, tether_name in PACKAGES.items():
        if fullname == torch_name or fullname.startswith(torch_name + "."):
            return tether_name + fullname[len(torch_name):]
    return None


class _AliasLoader(importlib.abc.Loader):
    """Loads a PyTorch name by importing Tether's module and putting it in sys.modules under
    PyTorch's name (the import system returns whatever sys.modules holds after exec_module)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        sys.modules[module.__name__] = importlib.import_module(self.target)


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Optional[Sequence[str]],
        target: Optional[types.ModuleType] = None,
    ) -> Optional[importlib.machinery.ModuleSpec]:
        tether_name = _counterpart(fullname)
        if tether_name is None:
            return None
        if importlib.util.find_spec(tether_name) is None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (Tether has no {tether_name})", name=fullname
            )
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(tether_name))


class Missing:
    """Stands for a name Tether lacks. Its attributes are placeholders too (a default argument
    `mode=RPCExecMode.SYNC` in a class body must not fail the import); every real use (call,
    comparison, hashing, `with`, iteration, truth, str) raises NotImplementedError naming it."""

    def __init__(self, qualified_name: str) -> None:
        object.__setattr__(self, "_name", qualified_name)
        object.__setattr__(self, "_children", {})

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"Tether lacks {object.__getattribute__(self, '_name')}")

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        children: Dict[str, "Missing"] = object.__getattribute__(self, "_children")
        if attr not in children:
            children[attr] = Missing(f"{object.__getattribute__(self, '_name')}.{attr}")
        return children[attr]

    __call__ = __enter__ = __iter__ = __bool__ = __len__ = __getitem__ = __contains__ = _fail
    __eq__ = __ne__ = __hash__ = __lt__ = __gt__ = __str__ = __format__ = _fail  # type: ignore
    __setattr__ = _fail  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<placeholder for {object.__getattribute__(self, '_name')}, which Tether lacks>"


TEST_SOURCES = [
    "distributed/rpc/*.py",
    "distributed/rpc/jit/*.py",
    "dist_utils.py",
    "common_distributed.py",
]


def imported_names() -> List[Tuple[str, str]]:
    """(module, name) of every `from torch.distributed.{rpc,autograd}... import name` in
    PyTorch's RPC test modules."""
    import torch.testing._internal as internal

    base = internal.__path__[0]
    found: List[Tuple[str, str]] = []
    for pattern in TEST_SOURCES:
        for path in sorted(glob.glob(f"{base}/{pattern}")):
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module and _counterpart(node.module):
                    found += [(node.module, alias.name) for alias in node.names]
    return found


def install_placeholders() -> List[str]:
    """Sets a Missing on Tether's modules for each name the tests import and Tether lacks;
    returns their PyTorch names."""
    placed: List[str] = []
    for module_name, name in imported_names():
        tether_name = _counterpart(module_name)
        assert tether_name is not None
        if importlib.util.find_spec(tether_name) is None:
            continue  # a missing module fails its import
        module = importlib.import_module(tether_name)
        if hasattr(module, name) or (
            hasattr(module, "__path__") and importlib.util.find_spec(f"{tether_name}.{name}")
        ):
            continue
        setattr(module, name, Missing(f"{module_name}.{name}"))
        placed.append(f"{module_name}.{name}")
    return placed


def install_tether_aliases(placeholders: bool = False) -> None:
    """Idempotent. Call before importing any module that uses torch.distributed.rpc."""
    global _installed
    if _installed:
        return
    _installed = True
    import torch  # noqa: F401  (imports PyTorch's rpc and autograd packages, replaced below)
    import torch.distributed

    for name in list(sys.modules):
        if _counterpart(name) is not None:
            del sys.modules[name]
    sys.meta_path.insert(0, _AliasFinder())
    for torch_name in PACKAGES:
        module = importlib.import_module(torch_name)
        setattr(torch.distributed, torch_name.rsplit(".", 1)[1], module)
    # Tether's submodules under PyTorch's names, so `torch.distributed.rpc.api` is found both as
    # an attribute and in sys.modules (as PyTorch's package imports its own).
    import tether.rpc

    for attr, value in vars(tether.rpc).items():
        if isinstance(value, types.ModuleType) and value.__name__.startswith("tether.rpc."):
            sys.modules.setdefault("torch.distributed.rpc." + attr, value)

    import torch.distributed.optim as torch_optim
    import tether.optim

    torch_optim.DistributedOptimizer = tether.optim.DistributedOptimizer  # type: ignore[attr-defined]
    if hasattr(torch_optim, "optimizer"):
        torch_optim.optimizer.DistributedOptimizer = tether.optim.DistributedOptimizer
    if placeholders:
        install_placeholders()


def check_aliases() -> None:
    """Raises AssertionError unless the aliases are in force (used by the runner's children)."""
    import torch.distributed.rpc as rpc

    assert rpc.__name__ == "tether.rpc", rpc.__name__
