"""Serve Tether's modules under PyTorch's names for PyTorch's RPC tests, as a user running a
program under `python -m tether.run` would get them: the aliases themselves are
`tether._aliases` (read it); this module adds what only the test runner wants.

With `placeholders=True`, a name that PyTorch's test modules import from those modules and Tether
lacks (`from torch.distributed.rpc.api import _use_rpc_pickler`) is set on Tether's module as a
placeholder that raises NotImplementedError, naming it, on any use (call, attribute, `with`, ...):
the test module then imports, and only the tests that use the name fail. Without it, the whole
test module fails to import, as it would for a user. A missing *module* (`_testing`) always fails
its import.
"""
import ast
import glob
import importlib
import importlib.util
from typing import Any, Dict, List, Tuple

from tether import _aliases

_counterpart = _aliases.counterpart
_placed = False


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
    global _placed
    _aliases.install()
    if placeholders and not _placed:
        _placed = True
        install_placeholders()


def check_aliases() -> None:
    """Raises unless the aliases are in force (used by the runner's children)."""
    _aliases.check()
