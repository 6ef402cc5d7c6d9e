"""A whole program as a simulated worker: each worker runs SCRIPT as `__main__`, as torchrun
would run it in each process (RANK, WORLD_SIZE, LOCAL_RANK, ... set), with PyTorch's RPC names
served by Tether (tether._aliases), so a program written for torch.distributed.rpc runs under the
simulator unedited.

A program that starts its own worker processes (torch.multiprocessing.spawn, multiprocessing)
cannot: the simulator starts the workers itself. Its Process.start fails with a SimulationError
that says so (tether.sim._child refuses it in every simulated worker).
"""
from __future__ import annotations

import ast
import os
import runpy
import sys
from typing import List, Sequence


def defines_main(path: str) -> bool:
    """Whether the script at `path` defines, at top level, a `main` that takes (rank,
    world_size): tether.sim's function form. Decided from the source, without running it."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise ValueError(f"{path} is not valid Python: {e}") from None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
            a = node.args
            positional = len(a.posonlyargs) + len(a.args)
            return positional >= 2 or a.vararg is not None
    return False


class ScriptMain:
    """`fn(rank, world_size)` for tether.sim.run / explore that runs the script at `path` as
    `__main__` with `sys.argv` = [path, *args] in the (forked) simulated worker."""

    def __init__(self, path: str, args: Sequence[str] = ()) -> None:
        self.path = os.path.abspath(path)
        self.args: List[str] = list(args)

    def __repr__(self) -> str:
        return f"ScriptMain({self.path!r}, {self.args!r})"

    def __call__(self, rank: int, world_size: int) -> None:
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world_size), GROUP_RANK="0",
            # The simulator is the rendezvous: init_rpc under tether.sim opens no store, but a
            # program may read these to build its init_method, as under torchrun.
            MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            MASTER_PORT=os.environ.get("MASTER_PORT", "29500"),
        )
        from tether import _aliases

        _aliases.install()
        sys.argv = [self.path, *self.args]
        sys.path.insert(0, os.path.dirname(self.path))
        try:
            runpy.run_path(self.path, run_name="__main__")
        except SystemExit as e:
            if e.code not in (None, 0):
                raise RuntimeError(
                    f"{os.path.basename(self.path)} exited with status {e.code!r}") from None
