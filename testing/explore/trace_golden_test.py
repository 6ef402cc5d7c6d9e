"""The explorer's traces, pinned: the trace hash (every delivered event) and event count of each
scenario over a fixed set of seeds, with every fault kind and with none, must equal the checked-in
golden file, testing/explore/trace_hashes.golden. A refactoring that claims to keep the protocol
as it was keeps this test green; anything that changes what is sent, when, or in what order (a
protocol change, a new timing constant, a scheduler change) fails it.

A change of behaviour that is meant: regenerate the golden file on purpose, and say why in the
commit message:

    bazel run //testing/explore:trace_golden_test -- --update
"""
import difflib
import os
import subprocess
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
EXPLORE = os.path.join(HERE, "explore")
GOLDEN = os.path.join(HERE, "trace_hashes.golden")
GOLDEN_IN_TREE = "testing/explore/trace_hashes.golden"
UPDATE = "bazel run //testing/explore:trace_golden_test -- --update"

# What is pinned: every scenario, these seeds, under these fault specs (seconds to run).
SEEDS = "1..20"
FAULTS = ("all", "none")

HEADER = f"""\
# Explorer trace hashes: --scenario=all --seeds={SEEDS} --trace-hash, for --faults={','.join(FAULTS)}.
# Checked by //testing/explore:trace_golden_test. Regenerate only for a change of behaviour that
# is meant (and say so in the commit): {UPDATE}
"""


def current():
    """The golden file's text for the tree as built."""
    lines = [HEADER]
    for faults in FAULTS:
        p = subprocess.run([EXPLORE, "--scenario=all", f"--seeds={SEEDS}", f"--faults={faults}",
                            "--trace-hash"], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise AssertionError(f"explore --faults={faults} failed ({p.returncode}):\n"
                                 f"{p.stdout[-4000:]}{p.stderr[-4000:]}")
        hashes = [line for line in p.stdout.splitlines() if line.startswith("trace-hash ")]
        if not hashes:
            raise AssertionError(f"explore --faults={faults} printed no trace hashes:\n"
                                 f"{p.stdout[-4000:]}")
        lines += [f"faults={faults} {line}\n" for line in hashes]
    return "".join(lines)


def compare(golden, now, limit=40):
    """'' if equal; otherwise what differs (a unified diff, at most `limit` lines) and how to
    regenerate the golden file."""
    if golden == now:
        return ""
    diff = list(difflib.unified_diff(golden.splitlines(), now.splitlines(), "golden", "now",
                                     lineterm="", n=0))
    changed = sum(1 for d in diff if d.startswith("+") and not d.startswith("+++"))
    shown = diff[:limit] + ([f"... ({len(diff) - limit} more diff lines)"] if len(diff) > limit
                            else [])
    return (f"the explorer's traces differ from {GOLDEN_IN_TREE} ({changed} lines changed): a "
            f"change of behaviour (what is sent, when, in what order). If that is a refactoring, "
            f"it is not behaviour-preserving: find why. If the protocol or a timing is meant to "
            f"change, regenerate the golden file on purpose and say so in the commit:\n"
            f"    {UPDATE}\n" + "\n".join(shown))


class TraceGoldenTest(unittest.TestCase):
    def test_traces_match_the_golden_file(self):
        with open(GOLDEN, encoding="utf-8") as fh:
            golden = fh.read()
        problem = compare(golden, current())
        if problem:
            self.fail(problem)

    def test_a_difference_is_reported_with_how_to_regenerate(self):
        golden = HEADER + "faults=all trace-hash scenario=a seed=1 hash=00 events=1\n"
        self.assertEqual(compare(golden, golden), "")
        text = compare(golden, golden.replace("hash=00", "hash=01"))
        self.assertIn("1 lines changed", text)
        self.assertIn("-faults=all trace-hash scenario=a seed=1 hash=00", text)
        self.assertIn("+faults=all trace-hash scenario=a seed=1 hash=01", text)
        self.assertIn(UPDATE, text)


def update():
    top = os.environ.get("BUILD_WORKSPACE_DIRECTORY")
    if not top:
        sys.exit(f"--update writes the source tree's golden file: run it as `{UPDATE}`")
    path = os.path.join(top, GOLDEN_IN_TREE)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(current())
    print(f"wrote {path}")


if __name__ == "__main__":
    if "--update" in sys.argv[1:]:
        update()
    else:
        unittest.main()
