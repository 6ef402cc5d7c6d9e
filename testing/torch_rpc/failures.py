"""Groups the Tether failures of a tools/torch-rpc-tests run by their first error line.

    /usr/bin/python3 -m testing.torch_rpc.failures OUT.jsonl [GUESSES.tsv] > FAILURES.md

GUESSES.tsv (optional): lines "SUBSTRING<TAB>guess at the cause"; a group whose error line
contains SUBSTRING gets the guess.
"""
import json
import re
import sys
from collections import defaultdict
from typing import Dict, List, Tuple


def normalize(detail: str) -> str:
    """The error line with what varies between tests (numbers, addresses, ids) blanked out."""
    detail = re.sub(r"0x[0-9a-f]+", "0x…", detail)
    detail = re.sub(r"\d+(\.\d+)?", "N", detail)
    return detail[:200]


def main(argv: List[str]) -> int:
    rows = [json.loads(line) for line in open(argv[0]) if line.strip()]
    guesses: List[Tuple[str, str]] = []
    if len(argv) > 1:
        for line in open(argv[1]):
            if "\t" in line:
                key, guess = line.rstrip("\n").split("\t", 1)
                guesses.append((key, guess))
    by_backend: Dict[str, Dict[str, dict]] = defaultdict(dict)
    for row in rows:
        by_backend[row["backend"]][row["test"]] = row
    groups: Dict[str, List[str]] = defaultdict(list)
    examples: Dict[str, str] = {}
    for test, row in by_backend["tether"].items():
        if row["status"] not in ("fail", "timeout"):
            continue
        torch = by_backend["torch"].get(test)
        note = ""
        if torch is None:
            note = " (PyTorch: not run)"
        elif torch["status"] != "pass":
            note = f" (PyTorch: {torch['status']})"
        key = "TIMEOUT" if row["status"] == "timeout" else normalize(row["detail"])
        groups[key].append(test + note)
        examples.setdefault(key, row["detail"])
    total = sum(len(v) for v in groups.values())
    print("# Tether's failures in PyTorch's RPC tests, by cause\n")
    print(f"{total} Tether failures (fail or timeout) from {argv[0]}, grouped by the first line of "
          "the first worker's error; the largest group first. \"(PyTorch: ...)\" marks a test that "
          "did not pass, or was not run, on PyTorch.\n")
    for key, tests in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        print(f"## {len(tests)}: `{examples[key][:300]}`\n")
        for substring, guess in guesses:
            if substring in examples[key]:
                print(f"Likely cause: {guess}\n")
                break
        for test in sorted(tests):
            print(f"- {test}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
