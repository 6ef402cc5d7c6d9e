"""Keeps the dependencies pointing one way (see /README.md, Architecture):

    core/  <-  sim/, transport/  <-  python/        testing/ may use everything

- core/ depends on nothing outside core/ (system libraries aside);
- sim/ and transport/ depend on core/ and themselves, never on each other or on testing/;
- python/ composes core/, sim/ and transport/, never testing/;
- everything under testing/ is testonly, so Bazel keeps it out of every shipped target;
- no target links both the production and the planted variant of a core library
  (//core:agent and //core:agent_planted, //core:rref_context and //core:rref_context_planted,
  //core:dist_autograd and //core:dist_autograd_planted):
  the same symbols twice.

It reads the BUILD files (deps, data, srcs, hdrs) and the #include lines of the C++ sources it is
given as data, and names the offending file and line.

Nothing escapes it: it finds every package of the source tree (every directory with a BUILD or
BUILD.bazel file, tools/, examples/ and third_party/ included; nested repositories with their
own WORKSPACE aside) and fails for a package in no layer it has a rule for (ALLOWED or
UNRESTRICTED below), and for a package, or a C++ source of a restricted layer, missing from its
data (testing/architecture/BUILD.bazel): what it is not given, it cannot check. Because that
compares the data with the tree itself, which Bazel does not see as an input, the test is tagged
"external" (never cached).
"""
import os
import re
import sys
import unittest

# The top-level directories holding the project's own code; anything else (absl/, gtest/,
# google/, torch/, @system//...) is a system library.
OWN = {"core", "sim", "transport", "python", "testing", "tools", "examples", "third_party"}

# What each layer may use, itself included (a layer is a top-level directory; "" is the root
# package).
ALLOWED = {
    "core": {"core"},
    "sim": {"core", "sim"},
    "transport": {"core", "transport"},
    "python": {"core", "sim", "transport", "python"},
    # Programs a user would write: the product only.
    "examples": {"python", "examples"},
    # Build glue over the system (toolchains, the TSan shim): nothing of ours.
    "third_party": {"third_party"},
}

# Layers that may use everything, and why. A package in a layer neither here nor in ALLOWED fails.
UNRESTRICTED = {
    "testing": "drives the system to check it (everything there is testonly, checked below)",
    "tools": "the commands people run: set-up, tests, demos, benchmarks",
    "": "the root package (workspace-wide settings only)",
}

# Variants of one library that must never be linked together.
EXCLUSIVE = [
    ("//core:agent", "//core:agent_planted"),
    ("//core:rref_context", "//core:rref_context_planted"),
    ("//core:dist_autograd", "//core:dist_autograd_planted"),
    ("//python:lifecycle", "//python:lifecycle_planted"),
]

LABEL_ATTRS = ("deps", "data", "srcs", "hdrs")
LINK_ATTRS = ("deps", "srcs", "hdrs")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"')


def layer_of(path):
    return path.replace(os.sep, "/").split("/", 1)[0]


def allowed_text(layer):
    return ", ".join(sorted(d + "/" for d in ALLOWED[layer]))


# --- #include lines ---

def include_violations(top, files):
    found = []
    for rel in files:
        layer = layer_of(rel)
        if layer not in ALLOWED:
            continue
        with open(os.path.join(top, rel), encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                m = INCLUDE.match(line)
                if not m:
                    continue
                target = layer_of(m.group(1))
                if target in OWN and target not in ALLOWED[layer]:
                    found.append(f"{rel}:{n}: {layer}/ may include only {allowed_text(layer)} "
                                 f"(and system headers): {line.strip()}")
    return found


# --- BUILD files ---

class Target:
    def __init__(self, package, kind, attrs, line):
        self.package = package
        self.kind = kind
        self.name = attrs.get("name", "")
        self.label = f"//{package}:{self.name}"
        self.attrs = attrs
        self.line = line

    @property
    def testonly(self):
        return bool(self.attrs.get("testonly")) or self.kind.endswith("_test")

    def labels(self, attrs=LABEL_ATTRS):
        for attr in attrs:
            value = self.attrs.get(attr) or []
            if isinstance(value, str):
                value = [value]
            for item in value:
                if isinstance(item, str):
                    yield item


def canonical(label, package):
    """A label as //pkg:name, or None for an external one (@system//:absl) or a plain file."""
    if label.startswith("@"):
        return None
    if label.startswith("//"):
        pkg, _, name = label[2:].partition(":")
        return f"//{pkg}:{name or pkg.rsplit('/', 1)[-1]}"
    if label.startswith(":"):
        return f"//{package}:{label[1:]}"
    return f"//{package}:{label}"


def _namespace(package, text, targets):
    """The globals a BUILD file runs in: every rule it calls records a Target; the few Bazel
    helpers whose value matters are stubbed."""
    def rule(kind):
        def call(*args, **attrs):
            if "name" in attrs:
                targets.append(Target(package, kind, attrs, sys._getframe(1).f_lineno))
            return attrs.get("name")
        return call

    ns = {"__builtins__": __builtins__}
    for name in set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", text)):
        if not hasattr(__builtins__, name) and name not in dir(__builtins__):
            ns[name] = rule(name)
    ns.update(
        glob=lambda *a, **k: [],
        select=lambda choices, **k: [x for v in choices.values() for x in v],
        load=lambda *a, **k: None,
        package=lambda **k: None,
        exports_files=lambda *a, **k: None,
    )
    return ns


def parse_build(top, rel):
    package = os.path.dirname(rel).replace(os.sep, "/")
    with open(os.path.join(top, rel), encoding="utf-8") as fh:
        text = fh.read()
    targets = []
    exec(compile(text, rel, "exec"), _namespace(package, text, targets))
    return targets, text.splitlines()


def line_of(lines, target, label):
    """The line naming `label` inside `target`'s call (the call's line when it comes from a list
    constant)."""
    start = None
    for i, line in enumerate(lines):
        if re.search(r'\bname\s*=\s*"%s"' % re.escape(target.name), line):
            start = i
            break
    if start is None:
        return target.line
    for i in range(start, len(lines)):
        if f'"{label}"' in lines[i]:
            return i + 1
        if i > start and re.match(r"^\)", lines[i]):
            break
    return start + 1


def build_violations(top, build_files):
    parsed = {}
    targets = {}
    for rel in build_files:
        ts, lines = parse_build(top, rel)
        parsed[rel] = (ts, lines)
        for t in ts:
            targets[t.label] = t
    found = []
    for rel, (ts, lines) in sorted(parsed.items()):
        for t in ts:
            layer = layer_of(t.package)
            if layer == "testing" and not t.testonly and t.kind != "filegroup":
                found.append(f"{rel}:{t.line}: {t.label} ({t.kind}) is in testing/ but not "
                             f"testonly = True")
            for raw in t.labels():
                dep = canonical(raw, t.package)
                if dep is None or not raw.startswith(("//", ":")) and "." in raw:
                    continue  # external, or a file of the same package
                dep_layer = layer_of(dep[2:].split(":", 1)[0])
                where = f"{rel}:{line_of(lines, t, raw)}: {t.label} depends on {raw}"
                if layer in ALLOWED and dep_layer in OWN and dep_layer not in ALLOWED[layer]:
                    found.append(f"{where}: {layer}/ may depend only on {allowed_text(layer)} "
                                 f"(and system libraries)")
                elif not t.testonly and (dep_layer == "testing" or
                                         (dep in targets and targets[dep].testonly)):
                    found.append(f"{where}: a target that is not testonly uses test code")
    found += exclusive_violations(targets)
    return found


def exclusive_violations(targets):
    closure = {}

    def reach(label, stack=()):
        if label in closure:
            return closure[label]
        closure[label] = set()  # cycles: Bazel rejects them, do not loop here
        t = targets.get(label)
        out = {label}
        if t is not None:
            # What is linked in: not `data` (a shared object a test loads is a file beside it).
            for raw in t.labels(LINK_ATTRS):
                dep = canonical(raw, t.package)
                if dep is not None and dep in targets:
                    out |= reach(dep)
        closure[label] = out
        return out

    found = []
    for label, t in sorted(targets.items()):
        deps = reach(label)
        for a, b in EXCLUSIVE:
            if a in deps and b in deps:
                found.append(f"{t.package}/BUILD.bazel:{t.line}: {label} links both {a} and {b} "
                             f"(the same symbols twice): depend on the _api target in libraries "
                             f"and pick one variant at the top")
    return found


# --- the tree under test ---

BUILD_NAMES = ("BUILD.bazel", "BUILD")
DATA_LIST = "testing/architecture/BUILD.bazel"


def workspace_top():
    """Where the files the test is given are: its runfiles under `bazel test`."""
    srcdir = os.environ.get("TEST_SRCDIR")
    if srcdir:
        return os.path.join(srcdir, os.environ.get("TEST_WORKSPACE", "tether"))
    return source_top()


def source_top():
    """The source tree itself (the runfiles are symlinks into it)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def tree(top):
    """(C++ sources, BUILD files) under `top`, as paths relative to it: every package's BUILD
    file, outside version control, Bazel's output links and nested repositories."""
    sources, builds = [], []
    for dirpath, dirs, files in os.walk(top):
        rel_dir = os.path.relpath(dirpath, top)
        rel_dir = "" if rel_dir == "." else rel_dir
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "bazel-")) and
                         not os.path.exists(os.path.join(dirpath, d, "WORKSPACE")))
        for f in sorted(files):
            rel = os.path.join(rel_dir, f)
            if f in BUILD_NAMES:
                builds.append(rel)
            elif f.endswith((".h", ".cc")) and ".pb." not in f:
                sources.append(rel)
    return sources, builds


def package_of(build):
    return os.path.dirname(build).replace(os.sep, "/")


def label_of(build):
    return f"//{package_of(build)}:{os.path.basename(build)}"


def coverage_violations(top, source):
    """What the tree at `source` has that the test cannot check at `top` (its runfiles): a
    package in no layer with a rule; a package or a restricted layer's C++ source not given as
    data."""
    given_sources, given_builds = tree(top)
    sources, builds = tree(source)
    found = []
    for b in builds:
        layer = layer_of(package_of(b))
        if layer not in ALLOWED and layer not in UNRESTRICTED:
            found.append(f"{b}: package //{package_of(b)} is in no layer layering_test has a rule "
                         f"for: add '{layer}' to ALLOWED (what it may use) or UNRESTRICTED (why "
                         f"it may use everything) in testing/architecture/layering_test.py")
        if b not in given_builds:
            found.append(f"{b}: package //{package_of(b)} is not in layering_test's data: add "
                         f'"{label_of(b)}" (or its sources filegroup) in {DATA_LIST}')
    for s in sources:
        if layer_of(s) in ALLOWED and s not in given_sources:
            found.append(f"{s}: not in layering_test's data, so its #includes go unchecked: "
                         f"give its package's sources filegroup in {DATA_LIST}")
    return found


def violations(top):
    sources, builds = tree(top)
    return include_violations(top, sources) + build_violations(top, builds)


class LayeringTest(unittest.TestCase):
    def test_dependencies_point_one_way(self):
        top = workspace_top()
        sources, builds = tree(top)
        for layer in ("core", "sim", "transport"):
            self.assertTrue(any(layer_of(s) == layer for s in sources), f"no {layer}/ sources")
        found = violations(top)
        self.assertEqual(found, [], "\n" + "\n".join(found))

    def test_every_package_is_checked(self):
        source = source_top()
        self.assertTrue(os.path.exists(os.path.join(source, "WORKSPACE")),
                        f"cannot find the source tree (from {__file__}): {source}")
        _, builds = tree(source)
        # The walk itself finds packages in every layer (tools/, examples/ and nested ones too).
        for pkg in ("", "core", "sim/process", "transport/faulty", "python", "testing/explore",
                    "tools", "examples", "third_party/tsan"):
            self.assertIn(pkg, {package_of(b) for b in builds})
        found = coverage_violations(workspace_top(), source)
        self.assertEqual(found, [], "\n" + "\n".join(found))

    def test_a_package_without_a_rule_or_data_is_caught(self):
        import tempfile
        with tempfile.TemporaryDirectory() as given, tempfile.TemporaryDirectory() as source:
            def write(top, rel, text=""):
                os.makedirs(os.path.join(top, os.path.dirname(rel)), exist_ok=True)
                with open(os.path.join(top, rel), "w") as fh:
                    fh.write(text)
            for top in (given, source):
                write(top, "BUILD.bazel")
                write(top, "core/BUILD.bazel")
                write(top, "core/a.cc")
                write(top, "tools/BUILD.bazel")
            write(source, "core/b.h")                 # a source not given
            write(source, "core/sub/BUILD")           # a package not given (a BUILD file)
            write(source, "bench/BUILD.bazel")        # a new layer, no rule, not given
            write(source, "testing/x.cc")             # unrestricted: its sources need not be
            write(source, "third_party/repo/WORKSPACE")   # another repository: not a package
            write(source, "third_party/repo/BUILD")
            write(source, ".git/BUILD")
            found = coverage_violations(given, source)
            text = "\n".join(found)
            expected = [
                "bench/BUILD.bazel: package //bench is in no layer layering_test has a rule for",
                'bench/BUILD.bazel: package //bench is not in layering_test\'s data: add '
                '"//bench:BUILD.bazel"',
                'core/sub/BUILD: package //core/sub is not in layering_test\'s data: add '
                '"//core/sub:BUILD"',
                "core/b.h: not in layering_test's data",
            ]
            for e in expected:
                self.assertIn(e, text)
            self.assertEqual(len(found), len(expected), text)

    def test_planted_violations_are_caught(self):
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            def write(rel, text):
                os.makedirs(os.path.join(d, os.path.dirname(rel)), exist_ok=True)
                with open(os.path.join(d, rel), "w") as fh:
                    fh.write(text)
            write("core/a.cc", '#include "core/a.h"\n#include "sim/sim_world.h"\n'
                               '#include "absl/status/status.h"\n#include <vector>\n')
            write("sim/b.cc", '#include "core/agent.h"\n#include "transport/frame.h"\n'
                              '  #include "testing/scenarios/scenario.h"\n')
            write("transport/c.h", '#include "sim/random.h"\n#include "transport/frame.h"\n')
            write("testing/d.cc", '#include "transport/frame.h"\n#include "sim/random.h"\n')
            write("core/BUILD.bazel", 'cc_library(name = "agent", srcs = ["agent.cc"])\n'
                                      'cc_library(name = "agent_planted", testonly = True)\n'
                                      'cc_library(\n    name = "ok",\n    deps = [":agent"],\n)\n')
            write("sim/BUILD.bazel", 'cc_library(\n    name = "w",\n    deps = [\n'
                                     '        "//core:agent",\n        "//testing:fixture",\n'
                                     '    ],\n)\n')
            write("transport/BUILD.bazel",
                  'cc_library(\n    name = "t",\n    deps = ["//sim:w", "@system//:absl"],\n)\n'
                  'cc_test(name = "t_test", deps = ["//testing:fixture"])\n')
            write("python/BUILD.bazel",
                  'cc_binary(\n    name = "_C.so",\n    deps = [\n        "//core:agent",\n'
                  '        "//testing:both",\n    ],\n)\n')
            write("testing/BUILD.bazel",
                  'cc_library(name = "fixture", testonly = True)\n'
                  'cc_library(name = "loose")\n'
                  'cc_test(\n    name = "both",\n    deps = [\n        "//core:agent",\n'
                  '        "//core:agent_planted",\n    ],\n)\n')
            found = violations(d)
            text = "\n".join(found)
            expected = [
                "core/a.cc:2: core/ may include only core/",
                "sim/b.cc:2: sim/ may include only core/, sim/",
                "sim/b.cc:3: sim/ may include only core/, sim/",
                "transport/c.h:1: transport/ may include only core/, transport/",
                "sim/BUILD.bazel:5: //sim:w depends on //testing:fixture: sim/ may depend only",
                "transport/BUILD.bazel:3: //transport:t depends on //sim:w: transport/ may",
                "transport/BUILD.bazel:5: //transport:t_test depends on //testing:fixture",
                "python/BUILD.bazel:5: //python:_C.so depends on //testing:both: python/ may",
                "testing/BUILD.bazel:2: //testing:loose (cc_library) is in testing/ but not",
                "testing/BUILD.bazel:3: //testing:both links both //core:agent and "
                "//core:agent_planted",
                "python/BUILD.bazel:1: //python:_C.so links both //core:agent and "
                "//core:agent_planted",
            ]
            for e in expected:
                self.assertIn(e, text)
            self.assertEqual(len(found), len(expected), text)


if __name__ == "__main__":
    sys.exit(unittest.main())
