"""python -m tether.run SCRIPT [ARGS...] | python -m tether.run -m MODULE [ARGS...]

Runs a program written for `torch.distributed.rpc` (and `torch.distributed.autograd`,
`torch.distributed.optim.DistributedOptimizer`) on Tether, unedited: PyTorch's names are served by
Tether's modules (tether._aliases) in this process and in the processes it starts with
multiprocessing or torch.multiprocessing (spawn or fork), then SCRIPT runs as `__main__` with
`sys.argv` = [SCRIPT, ARGS...], exactly as `python SCRIPT ARGS...` would run it. Under torchrun
(`torchrun --nproc_per_node=2 -m tether.run SCRIPT`) each worker gets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT from the launcher, as usual.

Anything Tether does not implement fails where the program uses it, naming it (for instance
`No module named 'torch.distributed.rpc._utils' (Tether has no tether.rpc._utils)`).
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import List, NoReturn, Optional, Sequence

USAGE = "usage: python -m tether.run SCRIPT [ARGS...]  |  python -m tether.run -m MODULE [ARGS...]"


class UsageError(Exception):
    """Bad arguments to tether.run (the message says what was wrong)."""


def check_script(path: str) -> str:
    """`path` as an absolute path, or UsageError naming what is wrong with it."""
    if not os.path.exists(path):
        raise UsageError(f"no such script: {path}")
    if os.path.isdir(path):
        raise UsageError(f"{path} is a directory, not a Python script")
    if not os.access(path, os.R_OK):
        raise UsageError(f"cannot read {path}")
    return os.path.abspath(path)


def parse(argv: Sequence[str]) -> tuple[str, str, List[str]]:
    """("path", SCRIPT, ARGS) or ("module", MODULE, ARGS) from tether.run's arguments."""
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        raise UsageError(USAGE if not args else USAGE + "\n\n" + (__doc__ or "").strip())
    if args[0] == "--":
        args = args[1:]
        if not args:
            raise UsageError("no script after --\n" + USAGE)
    elif args[0] == "-m":
        if len(args) < 2:
            raise UsageError("-m needs a module name\n" + USAGE)
        return "module", args[1], args[2:]
    elif args[0].startswith("-"):
        raise UsageError(f"unknown option {args[0]} (tether.run's own options are -m and --)\n"
                         + USAGE)
    return "path", check_script(args[0]), args[1:]


def run(kind: str, target: str, args: Sequence[str]) -> None:
    """Serves Tether under PyTorch's names, then runs `target` as `__main__`."""
    from tether import _aliases

    _aliases.install()
    if kind == "module":
        sys.argv = [target, *args]  # runpy sets argv[0] to the module's file
        runpy.run_module(target, run_name="__main__", alter_sys=True)
        return
    sys.argv = [target, *args]
    # As `python SCRIPT`: the script's directory first on sys.path, instead of this one's.
    sys.path[0] = os.path.dirname(target)
    runpy.run_path(target, run_name="__main__")


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    try:
        kind, target, args = parse(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"tether.run: {e}", file=sys.stderr)
        sys.exit(2)
    if kind == "module":
        import importlib.util

        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        if found is None:
            print(f"tether.run: no module named {target}", file=sys.stderr)
            sys.exit(2)
    run(kind, target, args)
    sys.exit(0)


if __name__ == "__main__":
    main()
