"""Tether: a distributed RPC framework for PyTorch; `tether.rpc` is a drop-in for
`torch.distributed.rpc`.

The engine is the C++ extension `tether._C`. It is found, in order: inside this package
(`tether/_C.so`: where the wheel, tools/wheel, installs it; in a source checkout
`python/tether/_C.so`, for instance a copy or symlink of the Bazel output), next to the package
(`python/_C.so`, which is where Bazel's runfiles put it for py_test), or in the workspace's
`bazel-bin/python/_C.so` after `bazel build //python:_C.so` (so `PYTHONPATH=python` works from
a source checkout). `$TETHER_C_EXTENSION`, if set, names the file to load instead (for
instance an optimized build: `bazel build -c opt //python:_C.so`).
"""
__version__ = "0.1.0"

import importlib.machinery
import importlib.util
import os
import sys

import torch  # noqa: F401  (the extension links libtorch_python: load torch first)


def _load_extension():
    override = os.environ.get("TETHER_C_EXTENSION")
    if not override:
        try:
            from . import _C  # type: ignore[attr-defined]

            return _C
        except ImportError:
            pass
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [override] if override else [
        os.path.join(here, "..", "_C.so"),
        os.path.join(here, "..", "..", "bazel-bin", "python", "_C.so"),
    ]
    for path in candidates:
        if os.path.exists(path):
            loader = importlib.machinery.ExtensionFileLoader(__name__ + "._C", path)
            spec = importlib.util.spec_from_file_location(__name__ + "._C", path, loader=loader)
            module = importlib.util.module_from_spec(spec)
            loader.exec_module(module)
            sys.modules[__name__ + "._C"] = module
            return module
    raise ImportError(
        "tether._C not found: run `bazel build //python:_C.so` in the workspace (or copy "
        "bazel-bin/python/_C.so into python/tether/)"
    )


_C = _load_extension()

__all__ = ["rpc"]
