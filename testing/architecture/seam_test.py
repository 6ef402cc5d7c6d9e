"""Keeps the seam: core/ and sim/ reach time, threads, randomness and the network only through
the Clock, Executor and Network interfaces, and never include libtorch.

A line may opt out with a `// seam-ok: <reason>` comment, trailing it or on the line just above
it, which reviewers see.
"""
import os
import re
import sys
import unittest

FORBIDDEN = [
    (r"std::thread|std::jthread|pthread_create|std::async\b", "starts a thread"),
    (r"system_clock|steady_clock|high_resolution_clock|absl::Now\(|gettimeofday|clock_gettime"
     r"|\btime\(\s*(nullptr|NULL|0)?\s*\)", "reads the wall clock"),
    (r"sleep_for|sleep_until|\busleep\(|\bnanosleep\(|absl::SleepFor", "sleeps"),
    (r"\brand\(|\bsrand\(|random_device|absl::BitGen|absl::InsecureBitGen|\bgetrandom\(",
     "draws unseeded randomness"),
    (r"std::unordered_map|std::unordered_set|flat_hash_set|node_hash_set|node_hash_map",
     "uses a container whose iteration order is not deterministic"),
    (r"flat_hash_map", "uses flat_hash_map (mark lookup-only uses with seam-ok)"),
    (r"#include\s*[<\"](torch|ATen|c10|caffe2)/", "includes libtorch"),
    (r"\bsocket\(|\bepoll_|\bconnect\(|\baccept\(", "touches the network directly"),
]

ROOTS = ["core", "sim"]


def source_files(top):
    for root in ROOTS:
        base = os.path.join(top, root)
        for dirpath, _, files in os.walk(base):
            for f in sorted(files):
                if f.endswith((".h", ".cc")) and not f.endswith("_test.cc") and ".pb." not in f:
                    yield os.path.join(dirpath, f)


def violations(top):
    found = []
    for path in source_files(top):
        with open(path, encoding="utf-8") as fh:
            previous = ""
            for n, line in enumerate(fh, 1):
                excused = "seam-ok:" in line or "seam-ok:" in previous
                previous = line
                if excused:
                    continue
                is_include = line.lstrip().startswith("#include")
                code = line if is_include else line.split("//", 1)[0]
                for pattern, what in FORBIDDEN:
                    if is_include != pattern.startswith("#include"):
                        continue
                    if re.search(pattern, code):
                        found.append(f"{os.path.relpath(path, top)}:{n}: {what}: {line.strip()}")
    return found


def workspace_top():
    # Under `bazel test` the sources are runfiles under TEST_SRCDIR/<workspace>.
    srcdir = os.environ.get("TEST_SRCDIR")
    if srcdir:
        return os.path.join(srcdir, os.environ.get("TEST_WORKSPACE", "tether"))
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SeamTest(unittest.TestCase):
    def test_core_and_sim_stay_behind_the_interfaces(self):
        top = workspace_top()
        files = list(source_files(top))
        self.assertGreater(len(files), 5, f"found too few sources under {top}")
        self.assertEqual(violations(top), [])

    def test_scanner_catches_a_planted_violation(self):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(os.path.join(d, "core"))
            with open(os.path.join(d, "core", "bad.cc"), "w") as fh:
                fh.write("auto t = std::chrono::steady_clock::now();\n"
                         "std::thread th([]{});\n"
                         "#include <ATen/ATen.h>\n"
                         "int ok = 1;  // steady_clock in a comment is fine\n"
                         "// seam-ok: lookups only\n"
                         "absl::flat_hash_map<int, int> index;\n")
            found = violations(d)
            self.assertEqual(len(found), 3, found)


if __name__ == "__main__":
    sys.exit(unittest.main())
