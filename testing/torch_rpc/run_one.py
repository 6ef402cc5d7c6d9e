"""Runs one PyTorch RPC test and writes its outcome as JSON (the runner's child process).

    TORCH_RPC_TESTS_BACKEND=tether python3 -m testing.torch_rpc.run_one RpcTest test_foo OUT.json

The test runs under unittest as PyTorch runs it: the test case spawns the workers (which import
this module again as __mp_main__, then testing.torch_rpc.suite to find their class), and the
parent checks their exit codes. OUT.json gets {"status": "pass"|"fail"|"skip", "detail": first
line, "text": the error text}. A test that hangs is killed by the runner (runner.py), which then
records the timeout itself.
"""
import json
import sys
import traceback
import unittest
from typing import Dict, List, Tuple

TEXT_LIMIT = 6000


def first_error_line(text: str) -> str:
    """The first line of the exception a traceback ends with.

    For a failure reported by MultiProcessTestCase ("Process 0 exited with error code 10 and
    exception: <the worker's traceback>"), that is the first worker's exception: the message
    line after the last frame of the first traceback in the text.
    """
    lines = text.splitlines()
    worker = [i for i, line in enumerate(lines) if "exited with error code" in line]
    if worker:
        # Only the first failing worker's traceback.
        end = next((i for i in worker[1:]), len(lines))
        lines = lines[worker[0] + 1:end]
    last_frame = -1
    for i, line in enumerate(lines):
        if line.startswith('  File "'):
            last_frame = i
    if last_frame >= 0:
        for line in lines[last_frame + 1:]:
            if line and not line.startswith(" "):
                return line.strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return text.strip()[:200]


class _Result(unittest.TestResult):
    def __init__(self) -> None:
        super().__init__()
        self.outcomes: List[Tuple[str, str]] = []

    def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        self.outcomes.append(("pass", ""))

    def addError(self, test: unittest.TestCase, err) -> None:  # type: ignore[no-untyped-def]  # noqa: N802
        self.outcomes.append(("fail", "".join(traceback.format_exception(*err))))

    def addFailure(self, test: unittest.TestCase, err) -> None:  # type: ignore[no-untyped-def]  # noqa: N802
        self.outcomes.append(("fail", "".join(traceback.format_exception(*err))))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802
        self.outcomes.append(("skip", reason))

    def addExpectedFailure(self, test: unittest.TestCase, err) -> None:  # type: ignore[no-untyped-def]  # noqa: N802
        self.outcomes.append(("pass", "expected failure"))

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
        self.outcomes.append(("fail", "unexpected success (the test is marked expectedFailure)"))


def run(class_name: str, test_name: str) -> Dict[str, str]:
    try:
        from testing.torch_rpc import suite

        cls = getattr(suite, class_name)
        if suite.BACKEND == "tether":
            from testing.torch_rpc.aliases import check_aliases

            check_aliases()
        case = cls(test_name)
    except BaseException:  # noqa: B902 (an import that fails is the test's result)
        text = "while loading the test class:\n" + traceback.format_exc()
        return {"status": "fail", "detail": "import: " + first_error_line(text), "text": text}
    result = _Result()
    case.run(result)
    if not result.outcomes:
        return {"status": "fail", "detail": "no outcome reported", "text": ""}
    status, text = result.outcomes[-1]
    if status == "fail":
        detail = first_error_line(text)
        if "terminated or timed out after" in text or "timed out after" in detail:
            status = "timeout"
    else:
        detail = text
    return {"status": status, "detail": detail, "text": text[-TEXT_LIMIT:]}


def main(argv: List[str]) -> int:
    class_name, test_name, out = argv
    outcome = run(class_name, test_name)
    with open(out, "w") as f:
        json.dump(outcome, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
