"""Serve Tether's modules under PyTorch's names, so a program written for
`torch.distributed.rpc` runs on Tether unchanged (`python -m tether.run` installs this).

After `install()`:
- `torch.distributed.rpc` is `tether.rpc`, and `torch.distributed.rpc.X` is `tether.rpc.X` for
  every submodule Tether has (api, backend_registry, constants, functions, internal, options,
  server_process_global_profiler, ...). A submodule Tether lacks fails to import with a
  ModuleNotFoundError that names it; a name Tether's module lacks fails as any missing name does
  (`ImportError: cannot import name 'X' from 'tether.rpc'`).
- `torch.distributed.autograd` (and its submodules) is `tether.autograd`.
- `torch.distributed.optim.DistributedOptimizer` is `tether.optim.DistributedOptimizer` (the rest
  of torch.distributed.optim stays PyTorch's: local optimizers do not use RPC).
- PyTorch modules built on RPC internals Tether does not have are refused where they are used:
  `torch.distributed.nn.RemoteModule` (device maps, TorchScript module templates) raises
  NotImplementedError naming it when instantiated (the rest of torch.distributed.nn imports).
- Processes this one starts with multiprocessing's (or torch.multiprocessing's) `spawn` or
  `forkserver` start method install the aliases too, before they re-import the main module: the
  preparation data multiprocessing sends them carries an object whose unpickling installs them.
  `fork` children inherit them. A child whose main module was imported before (a forkserver
  server that preloads `__main__`; Python 3.11's does not) stops with an error saying so.

`import torch` already imports PyTorch's own torch.distributed.rpc and autograd; their entries in
sys.modules are replaced, so every later import sees Tether's. Modules that bound PyTorch's
before (none of torch's own, as of 1.13, besides those two packages) keep it.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import multiprocessing.spawn
import sys
import types
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = ["PACKAGES", "counterpart", "install", "installed", "check"]

# PyTorch's package name -> Tether's.
PACKAGES: Dict[str, str] = {
    "torch.distributed.rpc": "tether.rpc",
    "torch.distributed.autograd": "tether.autograd",
}

_installed = False


def counterpart(fullname: str) -> Optional[str]:
    """Tether's name for the PyTorch module `fullname`, or None if Tether does not serve it."""
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


# PyTorch modules that use RPC internals Tether lacks: module -> (class names it defines, why).
REFUSED: Dict[str, Tuple[Tuple[str, ...], str]] = {
    "torch.distributed.nn.api.remote_module": (
        ("RemoteModule", "_RemoteModule"),
        "it needs the TensorPipe agent's device maps and TorchScript module templates; create "
        "the module on its owner with rpc.remote(owner, ModuleClass, args) and call it through "
        "the RRef (rref.rpc_sync().forward(x)) instead",
    ),
}


def _refusing_class(module: str, name: str, why: str) -> type:
    import torch

    public = f"{module.rsplit('.api.', 1)[0]}.{name}" if ".api." in module else f"{module}.{name}"

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        raise NotImplementedError(f"Tether does not implement {public}: {why}")

    # An nn.Module, so that a program's subclass of it still defines; making one fails.
    return type(name, (torch.nn.Module,), {"__init__": __init__, "__module__": module})


class _RefusedLoader(importlib.abc.Loader):
    """Stands in for a module of REFUSED: its classes refuse to be made, naming themselves;
    any other name fails as missing."""

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        names, why = REFUSED[module.__name__]
        for name in names:
            setattr(module, name, _refusing_class(module.__name__, name, why))

        def missing(attr: str) -> Any:
            raise AttributeError(f"Tether does not implement {module.__name__} (no {attr}): {why}")

        module.__getattr__ = missing  # type: ignore[method-assign]


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Optional[Sequence[str]],
        target: Optional[types.ModuleType] = None,
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname in REFUSED:
            return importlib.machinery.ModuleSpec(fullname, _RefusedLoader())
        tether_name = counterpart(fullname)
        if tether_name is None:
            return None
        if importlib.util.find_spec(tether_name) is None:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (Tether has no {tether_name})", name=fullname
            )
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(tether_name))


def installed() -> bool:
    return _installed


def install() -> None:
    """Idempotent. Call before importing any module that uses torch.distributed.rpc."""
    global _installed
    if _installed:
        return
    _installed = True
    import torch  # noqa: F401  (imports PyTorch's rpc and autograd packages, replaced below)
    import torch.distributed

    for name in list(sys.modules):
        if counterpart(name) is not None or name in REFUSED:
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
        torch_optim.optimizer.DistributedOptimizer = tether.optim.DistributedOptimizer  # type: ignore[attr-defined]
    _install_in_spawned_children()


def check() -> None:
    """Raises RuntimeError unless PyTorch's names are Tether's in this process."""
    import torch.distributed
    import torch.distributed.autograd
    import torch.distributed.rpc

    for torch_name, tether_name in PACKAGES.items():
        served = sys.modules.get(torch_name)
        attribute = getattr(torch.distributed, torch_name.rsplit(".", 1)[1])
        if getattr(served, "__name__", None) != tether_name or attribute is not served:
            raise RuntimeError(
                f"{torch_name} is not Tether's {tether_name} in this process (it is "
                f"{getattr(attribute, '__name__', attribute)!r}): tether._aliases.install() "
                "did not run before it was imported"
            )


# --- processes started with the spawn start method -----------------------------------------

# The key of multiprocessing's preparation data under which the hook travels; prepare() ignores
# keys it does not know.
_PREPARATION_KEY = "tether_aliases"


def _install_in_child() -> None:
    """Runs in a spawned child while it unpickles its preparation data: before the child
    re-imports the parent's main module (prepare()) and before it unpickles its target."""
    # prepare() records the main module it replaces whenever it imports the parent's: here,
    # before this child's prepare(), only a forkserver's server can have done so.
    if multiprocessing.spawn.old_main_modules:
        raise RuntimeError(
            "tether: this process's main module was imported before Tether could serve "
            "torch.distributed.rpc, so it would run PyTorch's RPC (a forkserver that preloads "
            "__main__ does that). Use the spawn or fork start method under python -m tether.run"
        )
    install()


class _ChildHook:
    """Unpickles as a call of _install_in_child (the object itself is never used)."""

    def __reduce__(self) -> Tuple[Callable[[], None], Tuple[()]]:
        return (_install_in_child, ())


def _install_in_spawned_children() -> None:
    original = multiprocessing.spawn.get_preparation_data
    if getattr(original, "_tether_aliases", False):
        return

    def get_preparation_data(name: str) -> Dict[str, Any]:
        data = original(name)
        data[_PREPARATION_KEY] = _ChildHook()
        return data

    get_preparation_data._tether_aliases = True  # type: ignore[attr-defined]
    # popen_spawn_posix and popen_forkserver look it up on the module at every start.
    multiprocessing.spawn.get_preparation_data = get_preparation_data
