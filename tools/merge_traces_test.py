"""tools/merge-traces: one timeline from per-worker traces, clocks aligned by the messages."""
import json
import os
import subprocess
import sys
import tempfile
import unittest

TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge-traces")


def trace(pid, *events):
    return {"traceEvents": [{"name": "process_name", "ph": "M", "pid": pid,
                             "args": {"name": f"worker{pid}"}}, *events]}


class MergeTracesTest(unittest.TestCase):
    def run_tool(self, docs, html=False):
        with tempfile.TemporaryDirectory() as d:
            paths = []
            for i, doc in enumerate(docs):
                paths.append(os.path.join(d, f"t{i}.json"))
                with open(paths[-1], "w") as fh:
                    fh.write(doc if isinstance(doc, str) else json.dumps(doc))
            out, page = os.path.join(d, "merged.json"), os.path.join(d, "merged.html")
            flags = ["--html", page] if html else []
            p = subprocess.run([sys.executable, TOOL, *flags, out, *paths], capture_output=True,
                               text=True)
            merged = json.load(open(out)) if p.returncode == 0 else None
            if html and p.returncode == 0:
                with open(page, encoding="utf-8") as fh:
                    merged["page"] = fh.read()
            return p, merged

    def test_aligns_a_receiver_whose_clock_is_behind(self):
        send = {"name": "PYTHON_CALL", "cat": "flow", "ph": "s", "pid": 0, "ts": 5000, "id": 9}
        recv = {"name": "PYTHON_CALL", "cat": "flow", "ph": "f", "pid": 1, "ts": 4000, "id": 9}
        p, merged = self.run_tool([trace(0, send), trace(1, recv)])
        self.assertEqual(p.returncode, 0, p.stderr)
        ts = {e["pid"]: e["ts"] for e in merged["traceEvents"] if e.get("cat") == "flow"}
        self.assertEqual(ts[0], 0)
        self.assertGreaterEqual(ts[1], ts[0])
        self.assertEqual(merged["otherData"]["clock_shift_us"], {"1": 1000})
        self.assertEqual({e["pid"] for e in merged["traceEvents"]}, {0, 1})

    def test_workers_on_one_clock_are_not_shifted(self):
        send = {"name": "X", "cat": "flow", "ph": "s", "pid": 0, "ts": 100, "id": 1}
        recv = {"name": "X", "cat": "flow", "ph": "f", "pid": 1, "ts": 150, "id": 1}
        p, merged = self.run_tool([trace(0, send), trace(1, recv)])
        self.assertEqual(merged["otherData"]["clock_shift_us"], {})

    def test_html_page_has_a_lane_per_worker_and_the_message(self):
        send = {"name": "send PYTHON_CALL", "cat": "message", "ph": "i", "pid": 0, "ts": 5000,
                "args": {"from": 0, "to": 1, "request_id": 9, "bytes": 3}}
        recv = dict(send, name="recv PYTHON_CALL", pid=1, ts=4000)
        flow_s = {"name": "PYTHON_CALL", "cat": "flow", "ph": "s", "pid": 0, "ts": 5000, "id": 9}
        flow_f = dict(flow_s, ph="f", pid=1, ts=4000)
        failed = {"name": "call failed", "cat": "error", "ph": "i", "pid": 0, "ts": 6000,
                  "args": {"detail": "<b>boom</b>"}}
        p, merged = self.run_tool([trace(0, send, flow_s, failed), trace(1, recv, flow_f)], html=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        page = merged["page"]
        self.assertTrue(page.startswith("<!DOCTYPE html>"))
        self.assertEqual(page.count('<g class="lane"'), 2)
        self.assertEqual(page.count('<g class="arrow call"'), 1)
        self.assertIn('<g class="mark error"', page)
        self.assertNotIn("<b>boom", page)
        self.assertNotIn("://", page)

    def test_garbage_is_refused_with_the_file_named(self):
        p, _ = self.run_tool(["not json"])
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("t0.json", p.stderr)


if __name__ == "__main__":
    unittest.main()
