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
"""
import os
import re
import sys
import unittest

# The top-level directories holding the project's own code; anything else (absl/, gtest/,
# google/, torch/, @system//...) is a system library.
OWN = {"core", "sim", "transport", "python", "testing", "tools", "examples", "third_party"}

# What each layer may use, itself included. Layers not listed (testing/, tools/, examples/) are
# unrestricted.
ALLOWED = {
    "core": {"core"},
    "sim": {"core", "sim"},
    "transport": {"core", "transport"},
    "python": {"core", "sim", "transport", "python"},
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

def workspace_top():
    srcdir = os.environ.get("TEST_SRCDIR")
    if srcdir:
        return os.path.join(srcdir, os.environ.get("TEST_WORKSPACE", "tether"))
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tree(top):
    sources, builds = [], []
    for layer in sorted(OWN):
        for dirpath, dirs, files in os.walk(os.path.join(top, layer)):
            dirs.sort()
            for f in sorted(files):
                rel = os.path.relpath(os.path.join(dirpath, f), top)
                if f == "BUILD.bazel":
                    builds.append(rel)
                elif f.endswith((".h", ".cc")) and ".pb." not in f:
                    sources.append(rel)
    return sources, builds


def violations(top):
    sources, builds = tree(top)
    return include_violations(top, sources) + build_violations(top, builds)


class LayeringTest(unittest.TestCase):
    def test_dependencies_point_one_way(self):
        top = workspace_top()
        sources, builds = tree(top)
        for layer in ("core", "sim", "transport"):
            self.assertTrue(any(layer_of(s) == layer for s in sources), f"no {layer}/ sources")
        for pkg in ("core", "sim", "transport", "python", "testing", "testing/explore"):
            self.assertIn(os.path.join(pkg, "BUILD.bazel"), builds)
        found = violations(top)
        self.assertEqual(found, [], "\n" + "\n".join(found))

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
