"""python -m tether.sim --report, opened in a real headless browser (Debian's chromium, which
tools/setup installs: without it this test fails, it does not skip).

The page's script writes a marker into the DOM once it has run (no script error on the way: the
page also records any error it sees), and a screenshot shows the lanes: the two lane background
colours fill wide horizontal bands, and the failure's red is drawn.
"""
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unittest
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTH, HEIGHT = 1280, 1500
LANE_COLOURS = {(0xfa, 0xfa, 0xfa), (0xf0, 0xf3, 0xf7)}  # .lane-bg.lane-0 / .lane-1 in report.py
FAILURE_RED = (0xc0, 0x00, 0x00)


def chromium(*args, profile):
    exe = shutil.which("chromium")
    assert exe, "chromium is not installed: run tools/setup (it installs Debian's chromium)"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-extensions", f"--user-data-dir={profile}",
           "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def decode_png(data):
    """(width, height, rows of RGB tuples) of an 8-bit RGB or RGBA non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    rows = []
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if ftype == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:
            line = bytearray((a + b) & 0xFF for a, b in zip(line, prev))
        elif ftype == 3:
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        rows.append([tuple(line[x:x + 3]) for x in range(0, stride, bpp)])
        prev = line
    return width, height, rows


class ReportInBrowserTest(unittest.TestCase):
    longMessage = False  # A failed check on the DOM says what, not the whole page.
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.mkdtemp(prefix="sim-report-")
        env = dict(os.environ, PYTHONHASHSEED="0")

        def report(script, seeds, faults, name):
            out = os.path.join(cls.dir, name)
            p = subprocess.run(
                [sys.executable, "-m", "tether.sim", os.path.join(HERE, script),
                 "--world-size", "2", "--seeds", seeds, "--faults", faults, "--quiet",
                 "--report", out], capture_output=True, text=True, env=env, timeout=600)
            return p, out

        cls.failing = report("user_exception.py", "1..2", "drop=0.1,dup=0.2,reorder=0.3",
                             "failing.html")
        cls.clean = report("correct.py", "1..2", "delay=0..2ms", "clean.html")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.dir, ignore_errors=True)

    def load(self, path, *args):
        profile = tempfile.mkdtemp(dir=self.dir)
        return chromium(*args, "file://" + path, profile=profile)

    def check_runs_in_browser(self, path, lanes):
        p = self.load(path, "--dump-dom")
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])
        dom = p.stdout
        self.assertIn('data-report-ready="yes"', dom, "the page's script did not finish")
        errors = re.search(r'data-js-errors="([^"]*)"', dom)
        self.assertIsNone(errors, errors and f"script errors: {errors.group(1)}")
        self.assertNotIn("Uncaught", p.stderr)
        m = re.search(r'<div id="report-status"[^>]*>rendered: (\d+) timelines, (\d+) lanes', dom)
        self.assertIsNotNone(m, "no rendering marker")
        self.assertEqual(int(m.group(2)), lanes)
        return dom

    def test_failure_report_loads_and_shows_the_lanes(self):
        p, path = self.failing
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("report written to", p.stdout)
        timelines = dom_groups(path)
        self.assertGreaterEqual(timelines, 1)
        dom = self.check_runs_in_browser(path, lanes=2 * timelines)
        self.assertIn("planted: the answer was wrong", dom, "the failure is not shown")
        self.assertIn("--seeds 1 --faults none", dom, "no shrunk replay command")

        png = os.path.join(self.dir, "failing.png")
        p = self.load(path, f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}",
                      "--hide-scrollbars")
        self.assertEqual(p.returncode, 0, p.stderr[-2000:])
        with open(png, "rb") as fh:
            width, height, rows = decode_png(fh.read())
        self.assertEqual((width, height), (WIDTH, HEIGHT))
        colours = {px for row in rows[::8] for px in row[::8]}
        self.assertGreater(len(colours), 20, "the screenshot is (nearly) one colour")
        # Lanes: rows of the screenshot mostly of one lane background colour, in two or more
        # separate bands.
        lane_rows = [y for y, row in enumerate(rows)
                     if sum(1 for px in row if px in LANE_COLOURS) > width * 0.3]
        bands = sum(1 for i, y in enumerate(lane_rows) if i == 0 or y != lane_rows[i - 1] + 1)
        self.assertGreaterEqual(bands, 2, "no lanes on the screenshot")
        red = sum(1 for row in rows for px in row
                  if sum(abs(a - b) for a, b in zip(px, FAILURE_RED)) < 60)
        self.assertGreater(red, 20, "the failure is not marked in red")

    def test_report_without_failures_says_so(self):
        p, path = self.clean
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        dom = self.check_runs_in_browser(path, lanes=0)
        self.assertIn("No failures: all 2 seeds passed.", dom, "no verdict")
        self.assertIn("passed: 1–2", dom, "no seeds listed")


def dom_groups(path):
    with open(path, encoding="utf-8") as fh:
        return fh.read().count('<svg class="timeline"')


if __name__ == "__main__":
    unittest.main()
