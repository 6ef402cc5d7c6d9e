"""tether.sim.report: the page's structure from hand-made traces (no extension, no browser).

The renderer is loaded from its file, as tools/merge-traces does: it imports nothing of tether.
"""
import dataclasses
import html.parser
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PATH = os.path.join(os.path.dirname(HERE), "tether", "sim", "report.py")
_spec = importlib.util.spec_from_file_location("tether_sim_report", PATH)
report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = report  # dataclasses look their module up
_spec.loader.exec_module(report)


def msg(pid, sent, type_name, src, dst, rid, ts, **extra):
    args = {"from": src, "to": dst, "request_id": rid, "bytes": 10, **extra}
    return {"name": f"{'send' if sent else 'recv'} {type_name}", "cat": "message", "ph": "i",
            "pid": pid, "tid": 0, "ts": ts, "s": "t", "args": args}


def names(n):
    return [{"name": "process_name", "ph": "M", "pid": k, "args": {"name": f"worker{k} (rank {k})"}}
            for k in range(n)]


EVIL = "<script>document.title='pwned'</script>\"'&"

# Three workers: a call 0->1 and its reply, a call 1->2 lost, a duplicated delivery 2->0, two
# messages 0->2 of which the second overtakes the first, a crash, and main raising on worker1.
EVENTS = names(3) + [
    msg(0, True, "PYTHON_CALL", 0, 1, 1, 0),
    {"name": "PYTHON_CALL -> worker1", "cat": "call", "ph": "b", "pid": 0, "ts": 0, "id": 7},
    msg(1, False, "PYTHON_CALL", 0, 1, 1, 1500),
    msg(1, True, "RESPONSE", 1, 0, 1, 1600),
    msg(0, False, "RESPONSE", 1, 0, 1, 3000),
    {"name": "", "cat": "call", "ph": "e", "pid": 0, "ts": 3000, "id": 7},
    msg(1, True, "PYTHON_CALL", 1, 2, 2, 3100),                       # never received
    msg(2, True, "SCRIPT_CALL", 2, 0, 3, 3200),
    msg(0, False, "SCRIPT_CALL", 2, 0, 3, 4000),
    msg(0, False, "SCRIPT_CALL", 2, 0, 3, 4100),                      # the duplicate
    msg(0, True, "RREF_USER_DELETE", 0, 2, 4, 4200),
    msg(0, True, "RREF_USER_DELETE", 0, 2, 5, 4300),
    msg(2, False, "RREF_USER_DELETE", 0, 2, 5, 4400),                 # overtakes request 4
    msg(2, False, "RREF_USER_DELETE", 0, 2, 4, 4900),
    {"name": "crash", "cat": "fault", "ph": "i", "pid": 2, "ts": 5000},
    {"name": "main raised", "cat": "main", "ph": "i", "pid": 1, "ts": 5200,
     "args": {"error": 'Traceback (most recent call last):\n  File "/x/prog.py", line 12, in main\n'
              "    raise ValueError(x)\nValueError: " + EVIL}},
    {"name": "user " + EVIL, "cat": "user", "ph": "i", "pid": 1, "ts": 5300},
    {"name": "PYTHON_CALL", "cat": "flow", "ph": "s", "pid": 0, "ts": 0, "id": 99},
]


@dataclasses.dataclass
class FakeFailure:
    kind: str
    worker: str
    detail: str


@dataclasses.dataclass
class FakeResult:
    seed: int
    ok: bool
    failures: list
    plan: str = "none"
    faults: str = "all"
    virtual_seconds: float = 0.01
    events: int = 100
    trace_hash: int = 1
    trace: list = dataclasses.field(default_factory=list)

    def kinds(self):
        return sorted({f.kind for f in self.failures})


class _Checker(html.parser.HTMLParser):
    """Balanced tags (void elements aside), every <script> and attribute collected."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "path", "line", "rect", "circle"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.scripts, self.tags = [], [], 0, []
        self.in_script = False
        self.script_text = ""

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self.scripts += 1
            self.in_script = True
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        if tag == "script":
            self.in_script = False

    def handle_data(self, data):
        if self.in_script:
            self.script_text += data


def check_page(test, page):
    test.assertTrue(page.startswith("<!DOCTYPE html>"))
    test.assertNotRegex(page, r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/|https?://",
                        "the page must load nothing from a network")
    test.assertNotRegex(page, r"(?i)<(link|img|iframe)\b[^>]*(src|href)=")
    p = _Checker()
    p.feed(page)
    p.close()
    test.assertEqual(p.errors, [])
    test.assertEqual(p.stack, [])
    test.assertEqual(p.scripts, 1, "only the page's own script")
    return p


class TimelineTest(unittest.TestCase):
    def test_lanes_arrows_and_faults_from_the_events(self):
        tl = report.build_timeline(EVENTS, plan="drop=0.1,partition=0-1+2@1ms..2ms")
        self.assertEqual([label for _, label in tl.lanes],
                         ["worker0 (rank 0)", "worker1 (rank 1)", "worker2 (rank 2)"])
        kinds = sorted(a.kind for a in tl.arrows)
        self.assertEqual(kinds, ["call", "call", "control", "dup", "lost", "reordered", "reply"])
        lost = next(a for a in tl.arrows if a.kind == "lost")
        self.assertEqual((lost.src, lost.dst, lost.t_recv), (1, 2, None))
        self.assertEqual(len(tl.spans), 1)
        self.assertEqual((tl.spans[0].t0, tl.spans[0].t1), (0, 3000))
        failing = [m for m in tl.marks if m.kind == "failing-line"]
        self.assertEqual(len(failing), 1)
        self.assertIn("prog.py:12 in main: raise ValueError(x)", failing[0].label)
        self.assertEqual([(b.kind, b.lanes) for b in tl.bands],
                         [("partition", (0, 1, 2)), ("down", (2,))])
        self.assertEqual(tl.bands[0].t0, 1000)

    def test_svg_has_one_lane_per_worker_and_one_arrow_per_message(self):
        svg = report.render_timeline(report.build_timeline(EVENTS), ident="x")
        self.assertEqual(len(re.findall(r'<g class="lane"', svg)), 3)
        self.assertEqual(len(re.findall(r'<g class="arrow ', svg)), 7)
        self.assertIn('data-lanes="3" data-arrows="7"', svg)
        self.assertEqual(len(re.findall(r'<g class="mark failing-line"', svg)), 1)
        self.assertEqual(len(re.findall(r'<g class="mark fault"', svg)), 1)

    def test_a_long_idle_stretch_is_cut_out_of_the_axis(self):
        events = names(2) + [msg(0, True, "PYTHON_CALL", 0, 1, 1, 0),
                             msg(1, False, "PYTHON_CALL", 0, 1, 1, 1000),
                             {"name": "still waiting: x", "cat": "hang", "ph": "i", "pid": 0,
                              "ts": 600_000_000}]
        tl = report.build_timeline(events)
        axis = report._Axis([0, 1000, 600_000_000], 1000.0)
        self.assertEqual(len(axis.breaks), 1)
        self.assertGreater(axis.x(1000) - axis.x(0), 500, "the activity keeps most of the width")
        self.assertIn('class="break"', report.render_timeline(tl))

    def test_large_traces_are_capped_and_say_so(self):
        events = names(2)
        for i in range(5000):
            events += [msg(0, True, "PYTHON_CALL", 0, 1, i + 1, i * 10),
                       msg(1, False, "PYTHON_CALL", 0, 1, i + 1, i * 10 + 5)]
        tl = report.build_timeline(events, max_arrows=400)
        self.assertEqual(len(tl.arrows), 400)
        self.assertTrue(any("5000 messages" in n for n in tl.notes), tl.notes)
        page = report.render_trace_report({"traceEvents": events})
        self.assertLess(len(page), 2_000_000)
        self.assertIn("5000 messages: only the first", page)

    def test_a_receipt_before_its_send_is_still_one_arrow(self):
        # Unaligned clocks of a real run: the receiver's clock reads earlier than the sender's.
        events = names(2) + [msg(0, True, "PYTHON_CALL", 0, 1, 1, 5000),
                             msg(1, False, "PYTHON_CALL", 0, 1, 1, 4000),
                             msg(1, False, "RESPONSE", 1, 0, 8, 4500)]  # its send is not here
        tl = report.build_timeline(events)
        self.assertEqual([(a.t_send, a.t_recv, a.kind) for a in tl.arrows],
                         [(5000, 4000, "call")])
        self.assertIn("not aligned", tl.arrows[0].detail)
        self.assertEqual([m.label for m in tl.marks], ["recv RESPONSE"])

    def test_partitions_of_a_plan(self):
        self.assertEqual(report.plan_partitions("drop=0.05,partition=0+1>2@100ms..1.5s"),
                         [((0, 1), (2,), True, 100_000.0, 1_500_000.0,
                           "partition=0+1>2@100ms..1.5s")])
        self.assertEqual(report.plan_partitions("partition=0-1")[0][3:5], (0.0, None))
        self.assertEqual(report.plan_partitions("partition=0-1@2m3s..")[0][3:5],
                         (123_000_000.0, None))


class PageTest(unittest.TestCase):
    def sim_page(self, results):
        groups = []
        for sig, members in report.group_failures([r for r in results if not r.ok]).items():
            first = members[0]
            g = report.FailureGroup(sig, first.kinds(), [r.seed for r in members], first, first,
                                    f"replay {first.seed} {EVIL}", f"replay {first.seed} {EVIL}")
            g.timeline = report.build_timeline(EVENTS, failures=first.failures)
            groups.append(g)
        return report.render_sim_report(command="python -m tether.sim x.py " + EVIL,
                                        results=results, groups=groups), groups

    def test_failures_are_grouped_escaped_and_replayable(self):
        boom = lambda n: FakeFailure(  # noqa: E731
            "exception", f"worker{n}",
            f"Traceback ...\nValueError: bad value {n} at 0x7f00{n} " + EVIL)
        hang = FakeFailure("hang", "worker0", "did not finish; still waiting on:\n    "
                           "Future.wait at p.py:3 in main: f.wait()")
        results = [FakeResult(1, True, []), FakeResult(2, False, [boom(1)]),
                   FakeResult(3, False, [boom(2)]), FakeResult(4, False, [hang]),
                   FakeResult(5, True, [])]
        page, groups = self.sim_page(results)
        self.assertEqual([g.seeds for g in groups], [[2, 3], [4]])
        p = check_page(self, page)
        self.assertNotIn("<script>document", page)
        self.assertIn("&lt;script&gt;document.title=", page)
        self.assertNotIn("pwned'</script>", p.script_text)
        self.assertEqual(page.count('<svg class="timeline"'), 2)
        copies = [a for t, a in p.tags if t == "button" and "copy" in a.get("class", "")]
        pres = {a.get("id") for t, a in p.tags if t == "pre"}
        self.assertGreaterEqual(len(copies), 3)  # the command and one replay per group
        self.assertTrue(all(b["data-target"] in pres for b in copies))
        self.assertIn("3 of 5 seeds failed", page)
        self.assertIn("passed: 1, 5", page)
        self.assertIn('id="report-status"', page)

    def test_no_failures_says_so_and_lists_the_seeds(self):
        page, groups = self.sim_page([FakeResult(s, True, []) for s in range(1, 21)])
        check_page(self, page)
        self.assertEqual(groups, [])
        self.assertIn("No failures: all 20 seeds passed.", page)
        self.assertIn("passed: 1–20", page)

    def test_trace_page_renders_a_merged_real_trace(self):
        page = report.render_trace_report({"traceEvents": EVENTS, "otherData": {"x": EVIL}},
                                          title="t " + EVIL)
        check_page(self, page)
        self.assertNotIn(EVIL, page)
        self.assertEqual(page.count('<g class="lane"'), 3)

    def test_command_line_writes_the_page(self):
        with tempfile.TemporaryDirectory() as d:
            trace, out = os.path.join(d, "t.json"), os.path.join(d, "t.html")
            with open(trace, "w") as fh:
                json.dump({"traceEvents": EVENTS}, fh)
            p = subprocess.run([sys.executable, PATH, trace, "-o", out], capture_output=True,
                               text=True)
            self.assertEqual(p.returncode, 0, p.stderr)
            with open(out) as fh:
                check_page(self, fh.read())
            p = subprocess.run([sys.executable, PATH, os.path.join(d, "missing.json"), "-o", out],
                               capture_output=True, text=True)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("missing.json", p.stderr)


if __name__ == "__main__":
    unittest.main()
