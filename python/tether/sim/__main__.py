"""python -m tether.sim SCRIPT --world-size N --seeds A..B --faults SPEC [--trace FILE]
    [--report FILE] [-- ARGS]

Explores SCRIPT under the simulator, one run per seed, and reports every failure with the exact
command that replays it. Exit status 1 if any seed failed.

SCRIPT either defines `main(rank, world_size)`, which each simulated worker calls, or is a whole
program (no such main, or --as-main): each simulated worker then runs it as `__main__` with
`sys.argv` = [SCRIPT, ARGS...], RANK, WORLD_SIZE and LOCAL_RANK set as torchrun sets them, and
torch.distributed.rpc / autograd / optim.DistributedOptimizer served by Tether, so a program
written for torch.distributed.rpc runs unedited. A program that starts its own worker processes
(torch.multiprocessing.spawn) cannot run here: the simulator starts the workers; run it for real
with `python -m tether.run SCRIPT`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import sys
import time


def _reexec_with_fixed_hash_seed() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.environ["PYTHONHASHSEED"] = "0"
        os.execv(sys.executable, [sys.executable, "-m", "tether.sim"] + sys.argv[1:])


def _parse_seeds(text: str) -> range:
    try:
        if ".." in text:
            a, b = text.split("..", 1)
            lo, hi = int(a), int(b)
        else:
            lo = hi = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must be N or A..B, got {text!r}") from None
    if hi < lo:
        raise argparse.ArgumentTypeError(f"empty seed range {text!r}")
    return range(lo, hi + 1)


def _check_script(path: str) -> None:
    if not os.path.exists(path):
        sys.exit(f"tether.sim: no such script: {path}")
    if os.path.isdir(path):
        sys.exit(f"tether.sim: {path} is a directory, not a Python script")


def _load_main(path: str):
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location("__tether_sim_main__", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    main = getattr(module, "main", None)
    if not callable(main):
        sys.exit(f"tether.sim: {path} defines no main(rank, world_size)")
    return main


def _worker_function(args):
    """What each simulated worker runs: SCRIPT's main(rank, world_size), or SCRIPT as __main__."""
    from tether.sim._script import ScriptMain, defines_main

    _check_script(args.script)
    if not args.as_main:
        try:
            args.as_main = not defines_main(args.script)
        except (OSError, UnicodeDecodeError, ValueError) as e:
            sys.exit(f"tether.sim: {e}")
    if args.as_main:
        return ScriptMain(args.script, args.script_args)
    if args.script_args:
        sys.exit(f"tether.sim: the arguments after -- go to a program run as __main__, but "
                 f"{args.script} defines main(rank, world_size): add --as-main to run it whole")
    return _load_main(args.script)


def _replay_command(args, seed: int, faults: str, trace: bool = False) -> str:
    cmd = [sys.executable, "-m", "tether.sim", args.script, "--world-size",
           str(args.world_size), "--seeds", str(seed), "--faults", faults]
    if args.time_limit != DEFAULT_LIMIT:
        cmd += ["--time-limit", str(args.time_limit)]
    if trace:
        cmd += ["--trace", "trace.json"]
    if args.as_main:
        cmd += ["--as-main"]
    if args.script_args:
        cmd += ["--", *args.script_args]
    return " ".join(shlex.quote(c) for c in cmd)


DEFAULT_LIMIT = 600.0


def _bar(done: int, total: int, failed: int, started: float) -> None:
    width = 30
    filled = width * done // total
    rate = done / max(time.perf_counter() - started, 1e-9)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} seeds, "
                     f"{failed} failed, {rate:.1f} seeds/s ")
    sys.stderr.flush()
    if done == total:
        sys.stderr.write("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tether.sim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="a Python file: one defining main(rank, world_size), "
                        "or a whole program (see --as-main)")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--seeds", type=_parse_seeds, default=range(1, 2), help="N or A..B")
    parser.add_argument("--faults", default="none", help="none, all, or a spec such as "
                        "drop=0.05,delay=0..20ms,crash=1@200ms")
    parser.add_argument("--trace", help="write the (first failing, else first) run as a "
                        "Chrome trace to this file")
    parser.add_argument("--report", help="write an HTML page (self-contained, viewable offline) "
                        "of the failure groups, each with its shrunk run as a timeline")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_LIMIT,
                        help="virtual seconds before a run counts as hung")
    parser.add_argument("--no-shrink", action="store_true", help="do not shrink failing seeds")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--show-output", action="store_true",
                        help="show what the workers print (the default for a single seed)")
    parser.add_argument("--as-main", action="store_true",
                        help="run SCRIPT whole as __main__ in each worker (RANK and WORLD_SIZE "
                        "set, torch.distributed.rpc served by Tether); the default when SCRIPT "
                        "defines no main(rank, world_size)")
    argv = sys.argv[1:] if argv is None else list(argv)
    script_args = []
    if "--" in argv:  # What follows goes to the program (its sys.argv), not to tether.sim.
        at = argv.index("--")
        argv, script_args = argv[:at], argv[at + 1:]
    args = parser.parse_args(argv)
    args.script_args = script_args
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")

    import torch  # noqa: F401

    import tether.sim as sim
    from tether import _C

    try:
        _C.sim_parse_faults(args.faults)
    except ValueError as e:
        parser.error(str(e))
    fn = _worker_function(args)
    seeds = args.seeds
    failed_count = 0
    started = time.perf_counter()

    def progress(done, total, result):
        nonlocal failed_count
        failed_count += 0 if result.ok else 1
        if not args.quiet:
            _bar(done, total, failed_count, started)

    report = sim.explore(fn, args.world_size, seeds, args.faults, progress=progress,
                         time_limit=args.time_limit, record_trace=bool(args.trace) and len(seeds) == 1,
                         worker_output=args.show_output or len(seeds) == 1)
    virtual = sum(r.virtual_seconds for r in report.results)
    print()
    print(f"  seeds run        {len(report.results)}")
    print(f"  failed           {len(report.failed)}")
    for kind, n in sorted(report.by_kind().items()):
        print(f"    {kind:<14} {n}")
    print(f"  virtual time     {virtual:.3f} s")
    print(f"  wall time        {report.wall_seconds:.2f} s")
    shrunk = {}  # seed -> its shrunk run, for --report
    for r in report.failed:
        print()
        print(f"seed {r.seed} FAILED ({', '.join(r.kinds())}); faults drawn: {r.plan}")
        for f in r.failures:
            print("  " + str(f).replace("\n", "\n  "))
        print(f"  replay: {_replay_command(args, r.seed, args.faults)}")
        if not args.no_shrink and r.plan not in ("", "none"):
            small = sim.shrink(fn, args.world_size, r, time_limit=args.time_limit,
                               worker_output=False)
            shrunk[r.seed] = small
            if small.plan != r.plan or small.faults != r.faults:
                print(f"  shrunk: {_replay_command(args, r.seed, small.faults)}")
    if args.trace:
        target = report.failed[0] if report.failed else report.results[0]
        if not target.trace:
            target = sim.run(fn, args.world_size, target.seed, target.faults,
                             time_limit=args.time_limit, record_trace=True, worker_output=False)
        sim.write_trace(target, args.trace)
        print(f"\ntrace of seed {target.seed} written to {args.trace} "
              "(open it in Perfetto or chrome://tracing)")
    if args.report:
        from tether.sim.report import write_sim_report

        given = sys.argv[1:] if argv is None else list(argv)
        write_sim_report(
            args.report, command=" ".join(shlex.quote(a) for a in [
                "/usr/bin/python3", "-m", "tether.sim"] + given),
            results=report.results, shrunk=shrunk, wall_seconds=report.wall_seconds,
            replay=lambda seed, faults: _replay_command(args, seed, faults),
            rerun=lambda seed, faults: sim.run(fn, args.world_size, seed, faults,
                                               time_limit=args.time_limit, record_trace=True,
                                               worker_output=False))
        print(f"\nreport written to {args.report}")
    print(f"explored seeds={len(report.results)} failed={len(report.failed)}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    _reexec_with_fixed_hash_seed()
    sys.exit(main())
