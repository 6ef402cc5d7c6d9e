"""tools/torch-rpc-tests: PyTorch's own RPC test classes against Tether and against PyTorch.

Each test runs in a subprocess of its own (testing/torch_rpc/run_one.py, in a new process group:
a test that outlives --timeout is killed with all its workers and recorded as TIMEOUT), first on
every selected test against Tether, then against PyTorch. Results are appended to OUT.jsonl as
they come (so a run that is stopped keeps them, and --resume goes on from there), and OUT (a
Markdown table) and OUT.tsv are rewritten after every test.

RpcTestCommon has no tests of its own: its `_test_*` bodies run in tests of RpcTest and
TensorPipeAgentRpcTest (as PyTorch's generate_tests builds them). Those tests are run and
counted under their own class, and marked "common" in the table; `--class RpcTestCommon` selects
exactly them.
"""
import argparse
import datetime
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

# Not resolve(): under Bazel the runfiles tree (with the extension beside python/) is the repo.
REPO = Path(os.path.abspath(__file__)).parents[2]
SHIMS = Path(os.path.abspath(__file__)).parent / "shims"
BACKENDS = ("tether", "torch")
DEFAULT_CLASSES = ["RpcTest", "TensorPipeAgentRpcTest", "FaultyAgentRpcTest"]
COMMON = "RpcTestCommon"
COMMON_HOSTS = ("RpcTest", "TensorPipeAgentRpcTest")


@dataclass(frozen=True)
class Test:
    cls: str
    name: str
    index: int  # position in the class's sorted test list (what --slice indexes)
    common: bool  # runs a body of RpcTestCommon
    not_applicable: str  # why it cannot apply to Tether ("" if it can)

    @property
    def key(self) -> str:
        return f"{self.cls}.{self.name}"


@dataclass
class Outcome:
    status: str  # pass, fail, skip, timeout, n/a
    detail: str
    seconds: float


def _runner_env(backend: str, timeout: float, placeholders: bool) -> Dict[str, str]:
    env = dict(os.environ)
    path = [str(REPO), str(REPO / "python")]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    path.append(str(SHIMS))  # last: a real expecttest, if installed, wins
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["TORCH_RPC_TESTS_BACKEND"] = backend
    env["TORCH_RPC_TESTS_PLACEHOLDERS"] = "1" if placeholders else "0"
    # MultiProcessTestCase's own timeout (it then reports which worker hung) fires before ours.
    framework = int(timeout - 30) if timeout > 60 else int(timeout * 0.7)
    env["DISTRIBUTED_TESTS_DEFAULT_TIMEOUT"] = str(max(framework, 5))
    return env


def _not_applicable(class_name: str, fn: object) -> str:
    from testing.torch_rpc import suite

    if suite.CLASSES[class_name].gpu_only:
        return "needs CUDA GPUs (the whole class)"
    try:
        source = inspect.getsource(fn)  # type: ignore[arg-type]
    except (OSError, TypeError):
        source = ""
    gpus = re.search(r"skip_if_lt_x_gpu\((\d+)\)", source)
    if gpus:
        return f"needs {gpus.group(1)} CUDA GPU(s)"
    if "cuda" in getattr(fn, "__name__", "").lower():
        return "CUDA"
    return ""


def _uses_common(fn: object, common_names: Iterable[str]) -> bool:
    code = getattr(inspect.unwrap(fn), "__code__", None)  # type: ignore[arg-type]
    return code is not None and any(name in code.co_names for name in common_names)


def catalog(class_names: List[str]) -> List[Test]:
    """The tests of the classes, each class in unittest's (sorted) order."""
    os.environ["TORCH_RPC_TESTS_BACKEND"] = "torch"  # the runner lists PyTorch's own classes
    if str(SHIMS) not in sys.path:
        sys.path.append(str(SHIMS))
    from testing.torch_rpc import suite

    common_cls = getattr(
        __import__(suite.CLASSES["RpcTest"].module, fromlist=["RpcTestCommon"]), COMMON
    )
    common_names = [n for n in vars(common_cls) if not n.startswith("__")]
    tests: List[Test] = []
    wanted = list(class_names)
    only_common = False
    if COMMON in wanted:
        wanted.remove(COMMON)
        if not wanted:
            only_common = True
        wanted += [c for c in COMMON_HOSTS if c not in wanted]
    for class_name in wanted:
        cls = suite.original_class(class_name)
        for index, name in enumerate(suite.test_names(class_name)):
            fn = getattr(cls, name)
            common = class_name in COMMON_HOSTS and _uses_common(fn, common_names)
            if only_common and not common:
                continue
            tests.append(Test(class_name, name, index, common, _not_applicable(class_name, fn)))
    return tests


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_test(test: Test, backend: str, timeout: float, placeholders: bool, log: Path) -> Outcome:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="torch-rpc-test-") as tmp:
        result = Path(tmp) / "result.json"
        with open(log, "w") as log_file:
            child = subprocess.Popen(
                [sys.executable, "-m", "testing.torch_rpc.run_one", test.cls, test.name,
                 str(result)],
                cwd=tmp,
                env=_runner_env(backend, timeout, placeholders),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(child.pid)
                child.wait()
                return Outcome("timeout", f"killed after {timeout:.0f}s", time.monotonic() - start)
            finally:
                _kill_group(child.pid)  # workers the test left behind
        seconds = time.monotonic() - start
        if not result.exists():
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            last = tail[-1].strip() if tail else ""
            return Outcome("fail", f"crashed (exit code {code}): {last}"[:300], seconds)
        data = json.loads(result.read_text())
    return Outcome(data["status"], data["detail"], seconds)


# ---- the table ----------------------------------------------------------------------------

def _cell(outcome: Optional[Outcome]) -> str:
    if outcome is None:
        return "not run"
    text = {"pass": "pass", "fail": "FAIL", "skip": "skip", "timeout": "TIMEOUT",
            "n/a": "n/a"}[outcome.status]
    if outcome.detail and outcome.status != "pass":
        detail = outcome.detail.replace("|", "\\|").replace("\n", " ")
        if len(detail) > 240:
            detail = detail[:237] + "..."
        text += ": " + detail
    return text


def _failed(outcome: Optional[Outcome]) -> bool:
    return outcome is not None and outcome.status in ("fail", "timeout")


def category(results: Dict[str, Outcome], backends: Tuple[str, ...]) -> str:
    tether, torch = results.get("tether"), results.get("torch")
    if tether is not None and tether.status == "n/a":
        return "n/a on Tether"
    if any(r is not None and r.status == "skip" for r in (tether, torch)):
        return "skipped"
    if len(backends) == 1:
        only = results.get(backends[0])
        if only is None:
            return "not run"
        return {"pass": "passed", "fail": "failed", "timeout": "failed"}[only.status]
    if tether is None or torch is None:
        return "not run"
    if tether.status == "pass" and torch.status == "pass":
        return "passed on both"
    if _failed(tether) and torch.status == "pass":
        return "failed only on Tether"
    if tether.status == "pass" and _failed(torch):
        return "failed only on PyTorch"
    return "failed on both"


CATEGORIES_BOTH = ["passed on both", "failed only on Tether", "failed only on PyTorch",
                   "failed on both", "skipped", "n/a on Tether", "not run"]
CATEGORIES_ONE = ["passed", "failed", "skipped", "n/a on Tether", "not run"]


def write_tables(out: Path, tests: List[Test], results: Dict[Tuple[str, str], Outcome],
                 backends: Tuple[str, ...], header: List[str]) -> None:
    categories = CATEGORIES_BOTH if len(backends) == 2 else CATEGORIES_ONE
    per_class: Dict[str, Dict[str, int]] = {}
    rows = []
    for test in tests:
        by_backend = {b: results[(test.key, b)] for b in backends if (test.key, b) in results}
        cat = category(by_backend, backends)
        for cls in [test.cls] + ([COMMON] if test.common else []):
            counts = per_class.setdefault(cls, {c: 0 for c in categories})
            counts[cat] += 1
        rows.append((test, by_backend, cat))
    lines = ["# PyTorch's RPC tests on Tether and on PyTorch", ""] + header + [""]
    lines += ["## Summary", "",
              "| class | tests | " + " | ".join(categories) + " |",
              "|---|---|" + "---|" * len(categories)]
    for cls, counts in per_class.items():
        name = cls if cls != COMMON else f"{COMMON} (in {' and '.join(COMMON_HOSTS)}, counted there too)"
        lines.append(f"| {name} | {sum(counts.values())} | "
                     + " | ".join(str(counts[c]) for c in categories) + " |")
    statuses = ["pass", "fail", "timeout", "skip", "n/a"]
    lines += ["", "Per backend (tests run so far):", "",
              "| class | backend | " + " | ".join(statuses) + " | not run |",
              "|---|---|" + "---|" * (len(statuses) + 1)]
    for cls in per_class:
        members = [t for t in tests if t.cls == cls or (cls == COMMON and t.common)]
        for backend in backends:
            got = [results[(t.key, backend)].status for t in members if (t.key, backend) in results]
            lines.append(f"| {cls} | {backend} | "
                         + " | ".join(str(got.count(st)) for st in statuses)
                         + f" | {len(members) - len(got)} |")
    lines += ["", "## Tests", "",
              "| class | # | test | common | " + " | ".join(backends) + " | category |",
              "|---|---|---|---|" + "---|" * len(backends) + "---|"]
    for test, by_backend, cat in rows:
        cells = [_cell(by_backend.get(b)) for b in backends]
        lines.append(f"| {test.cls} | {test.index} | {test.name} | {'yes' if test.common else ''} | "
                     + " | ".join(cells) + f" | {cat} |")
    out.write_text("\n".join(lines) + "\n")
    tsv = ["\t".join(["class", "index", "test", "common", "not_applicable", "backend", "status",
                      "seconds", "detail"])]
    for test, by_backend, _ in rows:
        for backend, outcome in by_backend.items():
            tsv.append("\t".join([test.cls, str(test.index), test.name, str(int(test.common)),
                                  test.not_applicable, backend, outcome.status,
                                  f"{outcome.seconds:.1f}",
                                  outcome.detail.replace("\t", " ").replace("\n", " ")]))
    out.with_suffix(".tsv").write_text("\n".join(tsv) + "\n")


def _load_jsonl(path: Path) -> Dict[Tuple[str, str], Outcome]:
    results: Dict[Tuple[str, str], Outcome] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                results[(row["test"], row["backend"])] = Outcome(
                    row["status"], row["detail"], row["seconds"])
    return results


def _select(tests: List[Test], slice_arg: Optional[str], names: Optional[str]) -> List[Test]:
    if names:
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        chosen = [t for t in tests if t.name in wanted or t.key in wanted]
        missing = [n for n in wanted if not any(n in (t.name, t.key) for t in chosen)]
        if missing:
            raise SystemExit(f"no such test(s): {', '.join(missing)}")
        return chosen
    if slice_arg:
        a, _, b = slice_arg.partition(":")
        lo, hi = int(a or 0), int(b) if b else None
        return [t for t in tests if t.index >= lo and (hi is None or t.index < hi)]
    return tests


def _check_extension() -> str:
    override = os.environ.get("TETHER_C_EXTENSION")
    if override:
        if not os.path.exists(override):
            raise SystemExit(f"$TETHER_C_EXTENSION={override} does not exist")
        return override
    for candidate in (REPO / "python/tether/_C.so", REPO / "python/_C.so",
                      REPO / "bazel-bin/python/_C.so"):
        if candidate.exists():
            return str(candidate)
    raise SystemExit("tether._C not found: build //python:_C.so or set $TETHER_C_EXTENSION")


def _git_commit() -> str:
    if os.environ.get("TORCH_RPC_TESTS_COMMIT"):  # a copy of the tree outside git
        return os.environ["TORCH_RPC_TESTS_COMMIT"]
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/torch-rpc-tests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--class", dest="classes", action="append",
                        help="test class (repeatable or comma-separated; default: "
                             + ", ".join(DEFAULT_CLASSES) + "; also RpcTestCommon and the "
                             "autograd/optimizer/CUDA classes of testing/torch_rpc/suite.py)")
    parser.add_argument("--slice", help="A:B, test indices in each class's sorted order")
    parser.add_argument("--tests", help="comma-separated test names (or Class.test)")
    parser.add_argument("--backend", choices=["tether", "torch", "both"], default="both")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per test")
    parser.add_argument("--out", type=Path, default=Path("torch_rpc_tests.md"),
                        help="Markdown table; OUT.tsv and OUT.jsonl go beside it")
    parser.add_argument("--resume", action="store_true",
                        help="keep OUT.jsonl's results and run only what it lacks")
    parser.add_argument("--strict-imports", action="store_true",
                        help="no placeholders for the names PyTorch's test modules import "
                             "and Tether lacks: such a module then fails every test at import")
    parser.add_argument("--include-na", action="store_true",
                        help="also run on Tether the tests that cannot apply to it (CUDA)")
    parser.add_argument("--no-run", action="store_true",
                        help="run nothing: write the table from OUT.jsonl (for instance the "
                             "concatenation of several runs' files)")
    parser.add_argument("--list", action="store_true", help="list the selected tests and exit")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every selected test passed on every backend run "
                             "(a skip counts as a failure: it checked nothing)")
    args = parser.parse_args(argv)

    os.environ["TORCH_RPC_TESTS_BACKEND"] = "torch"  # this process only lists the tests
    classes: List[str] = []
    for c in args.classes or DEFAULT_CLASSES:
        classes += [x for x in c.split(",") if x]
    from testing.torch_rpc import suite

    unknown = [c for c in classes if c not in suite.CLASSES and c != COMMON]
    if unknown:
        raise SystemExit(f"unknown class(es): {', '.join(unknown)}; known: "
                         + ", ".join([COMMON] + list(suite.CLASSES)))
    tests = _select(catalog(classes), args.slice, args.tests)
    if args.list:
        for t in tests:
            print(f"{t.cls}\t{t.index}\t{t.name}\t{'common' if t.common else ''}\t"
                  f"{t.not_applicable}")
        return 0
    backends: Tuple[str, ...] = BACKENDS if args.backend == "both" else (args.backend,)
    extension = _check_extension() if "tether" in backends else "-"
    placeholders = not args.strict_imports

    out: Path = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    jsonl = out.with_suffix(".jsonl")
    logs = out.with_suffix(".logs")
    results = _load_jsonl(jsonl) if args.resume or args.no_run else {}
    if not (args.resume or args.no_run) and jsonl.exists():
        jsonl.unlink()
    import torch

    header = [
        f"- run: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, Tether {_git_commit()} "
        f"(extension {extension}), PyTorch {torch.__version__}, timeout {args.timeout:.0f} s",
        f"- classes: {', '.join(classes)}; {len(tests)} tests"
        + (f", slice {args.slice}" if args.slice else ""),
        "- Tether is served under PyTorch's names (testing/torch_rpc/aliases.py); "
        + ("names PyTorch's test modules import and Tether lacks are placeholders that raise "
           "when used (so only the tests that use them fail)" if placeholders else
           "strict imports: a test module importing a name Tether lacks fails all its tests"),
        "- n/a: cannot apply to Tether (CUDA); not run on Tether unless --include-na",
        f"- logs: {logs}/BACKEND/CLASS.TEST.log",
    ]
    failures = 0
    for backend in backends:
        for test in tests:
            if (test.key, backend) in results or args.no_run:
                continue
            if backend == "tether" and test.not_applicable and not args.include_na:
                outcome = Outcome("n/a", test.not_applicable, 0.0)
            else:
                outcome = run_test(test, backend, args.timeout, placeholders,
                                   logs / backend / f"{test.key}.log")
            results[(test.key, backend)] = outcome
            with open(jsonl, "a") as f:
                f.write(json.dumps({"test": test.key, "backend": backend, **vars(outcome)}) + "\n")
            print(f"{backend:6} {test.key:70} {_cell(outcome)[:150]} ({outcome.seconds:.0f}s)",
                  flush=True)
            write_tables(out, tests, results, backends, header)
    write_tables(out, tests, results, backends, header)
    for test in tests:
        for backend in backends:
            outcome = results.get((test.key, backend))
            if outcome is None or outcome.status != "pass":
                failures += 1
    summary_counts: Dict[str, int] = {}
    for (key, backend), outcome in results.items():
        summary_counts[f"{backend} {outcome.status}"] = summary_counts.get(
            f"{backend} {outcome.status}", 0) + 1
    print("summary: " + ", ".join(f"{k}: {v}" for k, v in sorted(summary_counts.items())))
    print(f"table: {out}")
    if args.check:
        passed = sum(1 for o in results.values() if o.status == "pass")
        print(f"{passed} passed, {failures} failed")
        return 1 if failures else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
