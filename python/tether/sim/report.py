"""One self-contained HTML page for a simulated exploration or a real run's trace.

    python -m tether.sim SCRIPT ... --report report.html        # failure groups, shrunk runs
    python -m tether.sim.report TRACE.json -o trace.html         # a --trace or merged real trace
    tools/merge-traces --html trace.html OUT.json TRACE.json...  # the same, from merge-traces

The page needs no network: CSS, script and the timelines (inline SVG drawn here) are all in the
file. A timeline has one lane per worker; each message is an arrow from the sender's lane at its
send time to the receiver's lane at its receive time; a call is a bar on the caller's lane from
request to reply; faults (crashes, messages lost, duplicated or overtaken, partitions from the
plan) and the failure (the line that raised, what a hung worker waits on) are marked; every mark
has hover text. Long idle stretches of virtual time are cut out of the axis (marked as breaks).

Pure Python, standard library only, and no import of the rest of tether (tools/merge-traces
loads this file by path, without torch). Everything user-controlled is escaped.
"""
from __future__ import annotations

import bisect
import dataclasses
import html
import json
import re
import sys
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "Timeline", "FailureGroup", "build_timeline", "render_timeline", "render_sim_report",
    "render_trace_report", "group_failures", "write_sim_report", "main",
]

# Caps that keep the file small for large runs (each is stated on the page when it applies).
MAX_ARROWS = 1500          # messages drawn per timeline (the first quarter and the last rest)
MAX_MARKS = 1500           # other marks (RRef events, user traces...) per timeline
MAX_TIMELINES = 12         # failure groups drawn with a timeline
MAX_SEED_ROWS = 500        # failing seeds listed in the seeds table
MAX_DETAIL_CHARS = 8000    # of one failure's text
MAX_SEEDS_PER_GROUP = 40   # seed numbers listed in a group's row

LANE_HEIGHT = 84
LEFT = 190                 # room for lane labels
TOP = 34                   # room for the time axis


def _e(text: Any) -> str:
    """Text for HTML/SVG content or a quoted attribute."""
    return html.escape(str(text), quote=True)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters)"


def _fmt_us(us: float) -> str:
    us = float(us)
    if abs(us) < 1000:
        return f"{us:.0f} µs"
    if abs(us) < 1_000_000:
        return f"{us / 1000:.3g} ms"
    return f"{us / 1e6:.4g} s"


# ---------------------------------------------------------------------------------------------
# The model of one timeline, built from Chrome trace events (core/trace_event.h).


@dataclasses.dataclass
class Arrow:
    type: str
    src: int
    dst: int
    t_send: float
    t_recv: Optional[float]  # None: never received (lost)
    kind: str  # "call", "reply", "error", "control", "lost", "dup", "reordered"
    detail: str


@dataclasses.dataclass
class Mark:
    lane: int
    t: float
    kind: str  # "fault", "failure", "failing-line", "error", "main", "user", "rref", "info"
    label: str
    detail: str


@dataclasses.dataclass
class Span:
    lane: int
    t0: float
    t1: Optional[float]  # None: no reply by the end of the trace
    label: str


@dataclasses.dataclass
class Band:
    lanes: Tuple[int, ...]
    t0: float
    t1: Optional[float]
    label: str
    kind: str = "partition"  # or "down" (a crashed worker)


@dataclasses.dataclass
class Timeline:
    lanes: List[Tuple[int, str]]  # (pid, label), in lane order
    arrows: List[Arrow]
    marks: List[Mark]
    spans: List[Span]
    bands: List[Band]
    end: float
    notes: List[str]

    def lane_index(self) -> Dict[int, int]:
        return {pid: i for i, (pid, _) in enumerate(self.lanes)}


_REPLY_TYPES = ("RESPONSE", "ERROR_RESPONSE", "ACK", "REPLY")


def _message_kind(type_name: str, args: dict) -> str:
    if "error" in args or type_name == "ERROR_RESPONSE":
        return "error"
    if type_name.endswith(_REPLY_TYPES) or "REPLY" in type_name or type_name.endswith("_ACK"):
        return "reply"
    if type_name.startswith(("SHUTDOWN", "RREF", "PYTHON_RREF", "DIST_AUTOGRAD", "CLEANUP")):
        return "control"
    return "call"


def _worker_key(name: str) -> str:
    """'worker1 (rank 1)' and 'worker1' name the same lane."""
    return re.sub(r"\s*\(rank \d+\)$", "", str(name))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_US = {"h": 3.6e9, "m": 6e7, "s": 1e6, "ms": 1e3, "us": 1.0, "µs": 1.0, "ns": 1e-3}


def _duration_us(text: str) -> Optional[float]:
    if text in ("0", ""):
        return 0.0
    total, pos = 0.0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            return None
        total += float(m.group(1)) * _UNIT_US[m.group(2)]
        pos = m.end()
    return total if pos == len(text) else None


def plan_partitions(plan: str) -> List[Tuple[Tuple[int, ...], Tuple[int, ...], bool, float,
                                             Optional[float], str]]:
    """The partitions of a concrete fault plan (sim/fault_spec.h): (left, right, one_way,
    start_us, end_us or None, token)."""
    out = []
    for token in plan.split(","):
        m = re.fullmatch(r"partition=([\d+]+)([->])([\d+]+)(?:@([^.]*)\.\.(.*))?", token.strip())
        if not m:
            continue
        start = _duration_us(m.group(4)) if m.group(4) is not None else 0.0
        end = _duration_us(m.group(5)) if m.group(5) else None
        if start is None:
            continue
        left = tuple(int(x) for x in m.group(1).split("+"))
        right = tuple(int(x) for x in m.group(3).split("+"))
        out.append((left, right, m.group(2) == ">", start, end, token.strip()))
    return out


def _failing_line(detail: str) -> str:
    """The user code line a failure points at: the innermost frame of a traceback, or where a
    hung worker waits ('... at file.py:12 in main: fut.wait()')."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', detail)
    for path, line, func, code in reversed(frames):
        if "/tether/" not in path and "/torch/" not in path:
            return f"{path.rsplit('/', 1)[-1]}:{line} in {func}: {code.strip()}"
    if frames:
        path, line, func, code = frames[-1]
        return f"{path.rsplit('/', 1)[-1]}:{line} in {func}: {code.strip()}"
    m = re.search(r" at (\S+:\d+ in .*)", detail)
    return m.group(1).strip() if m else ""


def build_timeline(events: Sequence[dict], *, plan: str = "", failures: Sequence[Any] = (),
                   end: Optional[float] = None, max_arrows: int = MAX_ARROWS,
                   max_marks: int = MAX_MARKS) -> Timeline:
    """The timeline of one run from its Chrome trace events; `failures` (objects with kind,
    worker and detail) are marked on their workers' lanes at the end; `plan` adds its
    partitions as bands."""
    names: Dict[int, str] = {}
    timed: List[Tuple[float, int, dict]] = []
    for order, ev in enumerate(events):
        if not isinstance(ev, dict):
            continue
        if ev.get("ph") == "M" and ev.get("name") == "process_name" and "pid" in ev:
            names.setdefault(int(ev["pid"]), str((ev.get("args") or {}).get("name", "")))
        elif isinstance(ev.get("ts"), (int, float)):
            timed.append((float(ev["ts"]), order, ev))
    timed.sort(key=lambda x: (x[0], x[1]))
    base = timed[0][0] if timed and timed[0][0] > 1e12 else 0.0  # unmerged wall-clock trace
    pids = set(names)
    for _, _, ev in timed:
        if ev.get("cat") != "failure" and "pid" in ev:
            pids.add(int(ev["pid"]))
        args = ev.get("args") or {}
        for k in ("from", "to"):
            if ev.get("cat") == "message" and isinstance(args.get(k), int):
                pids.add(int(args[k]))
    lanes = [(pid, names.get(pid) or f"worker {pid}") for pid in sorted(pids)]
    by_name = {_worker_key(label): pid for pid, label in lanes}

    arrows: List[Arrow] = []
    pending: Dict[tuple, List[int]] = defaultdict(list)  # key -> indices of unreceived arrows
    delivered: Dict[tuple, List[int]] = defaultdict(list)
    early: Dict[tuple, List[float]] = defaultdict(list)  # receipts not matched to a send yet
    marks: List[Mark] = []
    spans: List[Span] = []
    open_calls: Dict[Tuple[int, Any], int] = {}
    last = 0.0
    for ts, _, ev in timed:
        t = ts - base
        last = max(last, t)
        cat, name, args = ev.get("cat"), str(ev.get("name", "")), ev.get("args") or {}
        pid = int(ev.get("pid", 0))
        if cat == "message":
            sent = name.startswith("send ")
            type_name = name.split(" ", 1)[1] if " " in name else name
            src, dst = args.get("from", pid), args.get("to", pid)
            key = (src, dst, type_name, args.get("request_id"))
            info = (f"{type_name} {lanes_name(names, src)} → {lanes_name(names, dst)}, "
                    f"request {args.get('request_id')}, {args.get('bytes', '?')} bytes")
            if "error" in args:
                info += f"\nerror: {args['error']}"
            if sent:
                arrows.append(Arrow(type_name, src, dst, t, None, _message_kind(type_name, args),
                                    info + f"\nsent at {_fmt_us(t)}"))
                if early[key]:  # Its receipt came first: the two clocks disagree.
                    a, a.t_recv = arrows[-1], early[key].pop(0)
                    a.detail += (f", received at {_fmt_us(a.t_recv)}, before it was sent (the "
                                 "workers' clocks are not aligned)")
                    delivered[key].append(len(arrows) - 1)
                else:
                    pending[key].append(len(arrows) - 1)
            elif pending[key]:
                i = pending[key].pop(0)
                a = arrows[i]
                a.t_recv = t
                a.detail += f", received at {_fmt_us(t)} (after {_fmt_us(t - a.t_send)})"
                delivered[key].append(i)
            elif delivered[key]:  # A second copy of a message already delivered.
                first = arrows[delivered[key][-1]]
                arrows.append(Arrow(type_name, first.src, first.dst, first.t_send, t, "dup",
                                    "duplicate delivery (fault): " + info
                                    + f"\nsent at {_fmt_us(first.t_send)}, this copy received "
                                    f"at {_fmt_us(t)}"))
            else:  # Received before its send (clocks apart), or never sent on the trace.
                early[key].append(t)
        elif cat == "call":
            if ev.get("ph") == "b":
                spans.append(Span(pid, t, None, name))
                open_calls[(pid, ev.get("id"))] = len(spans) - 1
            elif ev.get("ph") == "e":
                i = open_calls.pop((pid, ev.get("id")), -1)
                if i >= 0:
                    spans[i].t1 = t
        elif cat == "flow":
            continue  # The message instants beside each flow event carry everything.
        elif cat == "failure":
            lane = by_name.get(_worker_key(args.get("worker", "")), lanes[0][0] if lanes else 0)
            marks.append(Mark(lane, t, "failure", name, str(args.get("detail", ""))))
        else:
            detail = "\n".join(f"{k}: {v}" for k, v in args.items())
            kind = {"fault": "fault", "error": "error", "hang": "failing-line", "main": "main",
                    "user": "user", "rref": "rref"}.get(str(cat), "info")
            if name == "main raised":
                kind = "failing-line"
                where = _failing_line(str(args.get("error", "")))
                if where:
                    name = f"main raised at {where}"
            elif kind == "error" and name.startswith("peer "):
                kind = "fault"
            marks.append(Mark(pid, t, kind, name, detail))
    end_t = max(last, (end or 0.0))
    for (src, dst, type_name, rid), times in early.items():
        for t in times:  # A trace that starts late: the send is not on it.
            marks.append(Mark(dst if isinstance(dst, int) else 0, t, "info", f"recv {type_name}",
                              f"{type_name} from {lanes_name(names, src)}, request {rid}: its "
                              "send is not on the trace"))

    # Faults visible in the message pattern.
    for a in arrows:
        if a.t_recv is None:
            a.kind = "lost"
            a.detail = ("never received (dropped, partitioned, lost in a crash, or still in "
                        "flight at the end): " + a.detail)
    by_channel: Dict[Tuple[int, int], List[Arrow]] = defaultdict(list)
    for a in arrows:
        if a.t_recv is not None and a.kind != "dup" and a.src != a.dst:
            by_channel[(a.src, a.dst)].append(a)
    for chan in by_channel.values():
        latest = float("-inf")
        for a in chan:  # In send order.
            if a.t_recv is not None and a.t_recv < latest:
                a.kind = "reordered"
                a.detail = "delivered out of order (reorder fault): " + a.detail
            latest = max(latest, a.t_recv or latest)

    for f in failures:
        worker = str(getattr(f, "worker", ""))
        lane = by_name.get(_worker_key(worker))
        if lane is None:
            m = re.fullmatch(r"rank (\d+)", worker)
            lane = int(m.group(1)) if m else (lanes[0][0] if lanes else 0)
        kind, detail = str(getattr(f, "kind", "")), str(getattr(f, "detail", ""))
        where = _failing_line(detail)
        marks.append(Mark(lane, end_t, "failure", f"FAILED: {kind}" + (f" at {where}" if where
                                                                         else ""),
                          _clip(detail, MAX_DETAIL_CHARS)))

    bands = []
    index = {pid for pid, _ in lanes}
    for left, right, one_way, t0, t1, token in plan_partitions(plan):
        affected = tuple(p for p in left + right if p in index)
        if affected:
            bands.append(Band(affected, t0, t1, f"partition {token.split('=', 1)[1]} "
                              f"({'one-way' if one_way else 'two-way'}): messages across it "
                              "are lost"))

    for m in marks:
        if m.kind == "fault" and m.label == "crash":
            bands.append(Band((m.lane,), m.t, None, "crashed: this worker is down from here",
                              "down"))

    notes = []
    if len(arrows) > max_arrows:
        head = max_arrows // 4
        notes.append(f"{len(arrows)} messages: only the first {head} and the last "
                     f"{max_arrows - head} are drawn (the file would be too large).")
        arrows = arrows[:head] + arrows[len(arrows) - (max_arrows - head):]
    minor = [m for m in marks if m.kind in ("rref", "user", "info", "main")]
    if len(minor) > max_marks:
        keep = set(map(id, minor[:max_marks // 4] + minor[len(minor) - (max_marks - max_marks // 4):]))
        notes.append(f"{len(minor)} minor marks (RRef events, user traces): only "
                     f"{max_marks} are drawn.")
        marks = [m for m in marks if m.kind not in ("rref", "user", "info", "main") or id(m) in keep]
    if len(spans) > max_arrows:
        notes.append(f"{len(spans)} calls: only the first {max_arrows} are drawn as bars.")
        spans = spans[:max_arrows]
    return Timeline(lanes, arrows, marks, spans, bands, end_t, notes)


def lanes_name(names: Dict[int, str], pid: Any) -> str:
    return _worker_key(names.get(pid, f"worker {pid}")) if isinstance(pid, int) else str(pid)


# ---------------------------------------------------------------------------------------------
# Drawing a timeline as SVG.


class _Axis:
    """Virtual time to x: linear, except that idle stretches longer than a fifth of what
    remains are cut down (and shown as breaks), so that a hang to the time limit or a long
    timeout does not squeeze the activity into a sliver."""

    def __init__(self, times: Iterable[float], width: float) -> None:
        ts = sorted(set(times) | {0.0})
        gaps = [(ts[i], ts[i + 1]) for i in range(len(ts) - 1)]
        widths = [b - a for a, b in gaps]
        self.breaks: List[Tuple[float, float]] = []
        for _ in range(12):
            total = sum(widths)
            if total <= 0:
                break
            i = max(range(len(widths)), key=widths.__getitem__)
            rest = total - widths[i]
            if widths[i] <= 0.2 * total or widths[i] <= 1000.0 or rest <= 0:
                break
            self.breaks.append(gaps[i])
            widths[i] = max(rest * 0.04, 1e-9)
        self._ts = ts
        self._xs = [0.0]
        for w in widths:
            self._xs.append(self._xs[-1] + w)
        self._scale = width / (self._xs[-1] or 1.0)
        self.width = width

    def x(self, t: float) -> float:
        return LEFT + self._interp(self._ts, self._xs, t) * self._scale

    def t(self, x: float) -> float:
        """The inverse, for tick labels."""
        return self._interp(self._xs, self._ts, (x - LEFT) / self._scale)

    @staticmethod
    def _interp(src: List[float], dst: List[float], v: float) -> float:
        """Piecewise-linear map from increasing `src` to `dst`, extended at the ends."""
        if len(src) < 2:
            return dst[0] + (v - src[0])
        i = min(max(bisect.bisect_right(src, v) - 1, 0), len(src) - 2)
        a, b = src[i], src[i + 1]
        frac = (v - a) / (b - a) if b > a else 0.0
        return dst[i] + frac * (dst[i + 1] - dst[i])


_MARK_SHAPES = {
    "fault": "M0,-7 L6,0 L0,7 L-6,0 Z",            # diamond
    "failure": "M-7,-7 L7,7 M7,-7 L-7,7",            # cross (stroked)
    "failing-line": "M0,-8 L7,6 L-7,6 Z",            # triangle
    "error": "M0,-6 L6,0 L0,6 L-6,0 Z",
}


def render_timeline(tl: Timeline, *, ident: str = "t") -> str:
    """The timeline as an inline <svg> (plus its notes), ids prefixed with `ident`."""
    n = len(tl.lanes)
    times = [0.0, tl.end]
    for a in tl.arrows:
        times.append(a.t_send)
        if a.t_recv is not None:
            times.append(a.t_recv)
    times += [m.t for m in tl.marks] + [s.t0 for s in tl.spans]
    times += [s.t1 for s in tl.spans if s.t1 is not None]
    for b in tl.bands:
        times += [b.t0] + ([b.t1] if b.t1 is not None else [])
    distinct = len(set(times))
    width = float(min(max(900, distinct * 7), 7000))
    axis = _Axis(times, width)
    total_w = int(LEFT + width + 60)
    total_h = int(TOP + n * LANE_HEIGHT + 20)
    index = tl.lane_index()

    def y(pid: int) -> float:
        return TOP + index.get(pid, 0) * LANE_HEIGHT + LANE_HEIGHT / 2

    out: List[str] = []
    w = out.append
    w(f'<svg class="timeline" id="{_e(ident)}" '
      f'width="{total_w}" height="{total_h}" viewBox="0 0 {total_w} {total_h}" '
      f'data-lanes="{n}" data-arrows="{len(tl.arrows)}">')
    w("<defs>")
    for kind in ("call", "reply", "error", "control", "lost", "dup", "reordered"):
        w(f'<marker id="{_e(ident)}-head-{kind}" class="head-{kind}" viewBox="0 0 10 10" refX="9" '
          'refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
          '<path d="M0,0 L10,5 L0,10 z"/></marker>')
    w("</defs>")
    # Lanes.
    for i, (pid, label) in enumerate(tl.lanes):
        top = TOP + i * LANE_HEIGHT
        w(f'<g class="lane" data-pid="{pid}"><rect class="lane-bg lane-{i % 2}" x="0" y="{top}" '
          f'width="{total_w}" height="{LANE_HEIGHT}"/>'
          f'<line class="lane-line" x1="{LEFT}" y1="{top + LANE_HEIGHT / 2}" '
          f'x2="{LEFT + width}" y2="{top + LANE_HEIGHT / 2}"/>'
          f'<text class="lane-label" x="8" y="{top + LANE_HEIGHT / 2 + 4}">{_e(label)}</text>'
          f'<title>{_e(label)}</title></g>')
    # Ticks (and the axis breaks).
    for k in range(11):
        x = LEFT + width * k / 10
        w(f'<line class="tick" x1="{x:.1f}" y1="{TOP - 6}" x2="{x:.1f}" y2="{total_h - 20}"/>'
          f'<text class="tick-label" x="{x:.1f}" y="{TOP - 10}">{_e(_fmt_us(axis.t(x)))}</text>')
    for a, b in axis.breaks:
        x0, x1 = axis.x(a), axis.x(b)
        w(f'<g class="break"><rect x="{x0:.1f}" y="{TOP}" width="{max(x1 - x0, 2):.1f}" '
          f'height="{n * LANE_HEIGHT}"/><title>{_e(_fmt_us(b - a))} with nothing on the trace, '
          f'cut out of the axis ({_e(_fmt_us(a))} to {_e(_fmt_us(b))})</title></g>')
    # Partition bands.
    for band in tl.bands:
        x0 = axis.x(band.t0)
        x1 = axis.x(band.t1) if band.t1 is not None else LEFT + width
        for pid in band.lanes:
            top = TOP + index[pid] * LANE_HEIGHT
            w(f'<rect class="band {band.kind}" x="{x0:.1f}" y="{top + 4}" width="{max(x1 - x0, 2):.1f}" '
              f'height="{LANE_HEIGHT - 8}"><title>{_e(band.label)}</title></rect>')
    # Calls as bars above the caller's lane, concurrent calls on up to three rows.
    row_ends: Dict[int, List[float]] = defaultdict(lambda: [float("-inf")] * 3)
    for sp in sorted(tl.spans, key=lambda sp: sp.t0):
        x0 = axis.x(sp.t0)
        x1 = axis.x(sp.t1) if sp.t1 is not None else LEFT + width
        ends = row_ends[sp.lane]
        row = next((r for r, e in enumerate(ends) if e <= x0), min(range(3), key=ends.__getitem__))
        ends[row] = max(ends[row], x1 + 1)
        yy = y(sp.lane) - 11 - 6 * row
        dur = (f"{_fmt_us(sp.t1 - sp.t0)}" if sp.t1 is not None else "no reply by the end")
        w(f'<rect class="span{"" if sp.t1 is not None else " open"}" x="{x0:.1f}" y="{yy:.1f}" '
          f'width="{max(x1 - x0, 1.5):.1f}" height="4"><title>{_e(sp.label)}: '
          f'{_e(dur)} (from {_e(_fmt_us(sp.t0))})</title></rect>')
    # Messages.
    for a in tl.arrows:
        x0, y0 = axis.x(a.t_send), y(a.src)
        if a.t_recv is None:
            x1 = min(x0 + 40, LEFT + width)
            y1 = y0 + (y(a.dst) - y0) * 0.5 if a.dst != a.src else y0 - 16
        else:
            x1, y1 = axis.x(a.t_recv), y(a.dst)
        head = f' marker-end="url(#{_e(ident)}-head-{a.kind})"'
        if a.src == a.dst and a.t_recv is not None:
            path = (f"M{x0:.1f},{y0:.1f} C{x0:.1f},{y0 - 22:.1f} {x1:.1f},{y1 - 22:.1f} "
                    f"{x1:.1f},{y1:.1f}")
        else:
            path = f"M{x0:.1f},{y0:.1f} L{x1:.1f},{y1:.1f}"
        lost = ""
        if a.t_recv is None:
            lost = (f'<path class="lost-x" d="M{x1 - 4:.1f},{y1 - 4:.1f} L{x1 + 4:.1f},{y1 + 4:.1f} '
                    f'M{x1 + 4:.1f},{y1 - 4:.1f} L{x1 - 4:.1f},{y1 + 4:.1f}"/>')
            head = ""
        w(f'<g class="arrow {a.kind}" data-type="{_e(a.type)}"><path class="hit" d="{path}"/>'
          f'<path class="shaft" d="{path}"{head}/>{lost}<title>{_e(a.detail)}</title></g>')
    # Marks, the important ones last (drawn on top). Faults and failures get a label below the
    # lane when there is room on one of two rows (hover shows everything in any case).
    order = {"rref": 0, "info": 0, "user": 1, "main": 2, "error": 3, "fault": 4,
             "failing-line": 5, "failure": 6}
    label_rows: Dict[int, List[Tuple[int, float, float]]] = defaultdict(list)
    labelled = sorted((m for m in tl.marks if m.kind in ("fault", "failure", "failing-line")),
                      key=lambda m: -order[m.kind])
    label_of: Dict[int, Tuple[str, float, str]] = {}
    for m in labelled:
        x = axis.x(m.t)
        text = m.label if len(m.label) <= 64 else m.label[:61] + "..."
        extent = 6.2 * len(text) + 8
        anchor = "end" if x > LEFT + width * 0.55 else "start"
        span = (x - extent, x) if anchor == "end" else (x, x + extent)
        taken = label_rows[m.lane]
        rows = [2] if m.kind == "fault" else [0, 1]
        for row in rows:
            if all(not (span[0] < b1 and b0 < span[1]) for r, b0, b1 in taken if r == row):
                taken.append((row, *span))
                label_of[id(m)] = (text, -30.0 if row == 2 else 22.0 + 13 * row, anchor)
                break
    for m in sorted(tl.marks, key=lambda m: order.get(m.kind, 0)):
        x, yy = axis.x(m.t), y(m.lane)
        title = f"{m.label} at {_fmt_us(m.t)}" + (f"\n{m.detail}" if m.detail else "")
        shape = _MARK_SHAPES.get(m.kind)
        body = f'<path d="{shape}"/>' if shape else '<circle r="3.5"/>'
        label = ""
        if id(m) in label_of:
            text, dy, anchor = label_of[id(m)]
            dx = -4 if anchor == "end" else 4
            label = (f'<text class="mark-label" x="{dx}" y="{dy:.0f}" text-anchor="{anchor}">'
                     f"{_e(text)}</text>")
        w(f'<g class="mark {m.kind}" transform="translate({x:.1f},{yy:.1f})">{body}{label}'
          f'<title>{_e(title)}</title></g>')
    w("</svg>")
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in tl.notes)
    legend = (
        '<p class="legend"><span class="k call">→ call</span> <span class="k reply">→ reply</span> '
        '<span class="k control">→ RRef / shutdown control</span> '
        '<span class="k error">→ error reply</span> <span class="k lost">×</span> lost '
        '<span class="k dup">→ duplicate</span> <span class="k reordered">→ overtaken</span> '
        '<span class="k fault">◆ fault</span> <span class="k failing-line">▲ failing line</span> '
        '<span class="k failure">✖ failure</span> <span class="k partition"><span class="swatch"></span> partition</span> <span class="k down"><span class="swatch"></span> crashed</span> '
        '— hover anything for details, click it to pin them below.</p>')
    return (f'<div class="timeline-box">{legend}<div class="scroll">{"".join(out)}</div>'
            f'<pre class="pinned" aria-live="polite"></pre>{notes}</div>')


# ---------------------------------------------------------------------------------------------
# Failure groups (one run's failures, grouped by what they say).


@dataclasses.dataclass
class FailureGroup:
    signature: str
    kinds: List[str]
    seeds: List[int]
    first: Any  # the SimResult of the lowest seed
    shrunk: Any  # its shrunk run (the same object when nothing shrank)
    replay: str
    shrunk_replay: str
    timeline: Optional[Timeline] = None


def _normalize(text: str) -> str:
    text = re.sub(r"0x[0-9a-fA-F]+", "0x…", text)
    text = re.sub(r"\bworker\s*\d+", "worker#", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text.strip()


def failure_signature(failures: Sequence[Any]) -> str:
    """What a run's failures say, with numbers, addresses and worker names masked: the kind and,
    per failure, the exception line of a traceback or the first line waited on."""
    parts = set()
    for f in failures:
        detail = str(getattr(f, "detail", ""))
        lines = [ln.strip() for ln in detail.splitlines() if ln.strip()]
        if "Traceback" in detail and lines:
            key = lines[-1]
        elif "still waiting on:" in detail:
            key = detail.split("still waiting on:", 1)[1].strip().splitlines()[0]
        else:
            key = lines[0] if lines else ""
        parts.add(f"[{getattr(f, 'kind', '')}] {_normalize(key)[:300]}")
    return " + ".join(sorted(parts))


def group_failures(failed: Sequence[Any]) -> Dict[str, List[Any]]:
    """The failed results by failure_signature, groups in order of their first seed."""
    groups: Dict[str, List[Any]] = {}
    for r in sorted(failed, key=lambda r: r.seed):
        groups.setdefault(failure_signature(r.failures), []).append(r)
    return groups


# ---------------------------------------------------------------------------------------------
# The page.


_CSS = """
:root { --call:#1f6fd1; --reply:#2e9a4f; --control:#8a8f98; --error:#d12f2f; --lost:#e07b00;
  --dup:#8e44ad; --reordered:#c2185b; --fault:#e07b00; --failure:#c00000; }
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 20px; color:#222; }
h1 { font-size: 22px; margin: 0 0 6px; } h2 { font-size: 18px; margin: 28px 0 6px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { border: 1px solid #ccc;
  padding: 3px 8px; text-align: left; vertical-align: top; } th { background: #f2f2f2; }
code, pre { font: 12px/1.35 ui-monospace, "DejaVu Sans Mono", monospace; }
pre.detail { background:#fbf3f3; border-left: 3px solid var(--failure); padding: 6px 10px;
  max-height: 240px; overflow: auto; white-space: pre-wrap; }
.cmd { display:flex; gap:6px; align-items:flex-start; margin: 4px 0; }
.cmd pre { background:#f4f6f8; border:1px solid #d5dbe1; padding:5px 8px; margin:0; flex:1;
  white-space: pre-wrap; word-break: break-all; user-select: all; }
button.copy { font-size: 12px; padding: 4px 10px; cursor: pointer; }
.ok { color: #2e7d32; font-weight: 600; } .bad { color: var(--failure); font-weight: 600; }
.note { color:#7a4b00; background:#fff6e0; padding:4px 8px; margin:4px 0; }
.scroll { overflow-x: auto; border: 1px solid #ddd; }
.timeline text { font-size: 11px; fill: #333; }
.lane-bg.lane-0 { fill: #fafafa; } .lane-bg.lane-1 { fill: #f0f3f7; }
.lane-line { stroke: #9aa5b1; stroke-width: 1; }
.lane-label { font-weight: 600; font-size: 12px !important; }
.tick { stroke: #e3e3e3; stroke-width: 1; } .tick-label { text-anchor: middle; fill:#777 !important; }
.break rect { fill: #ddd; opacity: .6; }
.band { fill: var(--lost); opacity: .14; } .band.down { fill: #555; opacity: .12; }
.span { fill: var(--call); opacity: .35; } .span.open { fill: var(--error); opacity: .5; }
.arrow .shaft { fill: none; stroke-width: 1.3; }
.arrow .hit { fill: none; stroke: transparent; stroke-width: 7; }
.arrow:hover .shaft, .mark:hover { stroke-width: 2.6; filter: brightness(.8); }
.arrow.call .shaft { stroke: var(--call); } .head-call { fill: var(--call); }
.arrow.reply .shaft { stroke: var(--reply); } .head-reply { fill: var(--reply); }
.arrow.control .shaft { stroke: var(--control); stroke-dasharray: 4 2; } .head-control { fill: var(--control); }
.arrow.error .shaft { stroke: var(--error); stroke-width: 1.8; } .head-error { fill: var(--error); }
.arrow.lost .shaft { stroke: var(--lost); stroke-dasharray: 3 2; stroke-width: 1.8; }
.lost-x { stroke: var(--lost); stroke-width: 2.2; }
.arrow.dup .shaft { stroke: var(--dup); stroke-dasharray: 1 2; stroke-width: 1.8; } .head-dup { fill: var(--dup); }
.arrow.reordered .shaft { stroke: var(--reordered); stroke-width: 1.8; } .head-reordered { fill: var(--reordered); }
.mark circle { fill: #5b6b7b; } .mark.user circle { fill: #1f6fd1; } .mark.main circle { fill: #2e9a4f; }
.mark.rref circle { fill: #b0b7bf; }
.mark.fault path { fill: var(--fault); stroke: #7a4300; }
.mark.error path { fill: var(--error); }
.mark.failing-line path { fill: var(--failure); stroke: #600; }
.mark.failure path { stroke: var(--failure); stroke-width: 3.5; }
.mark-label { font-weight: 700; fill: var(--failure) !important; }
.mark.fault .mark-label { fill: #7a4300 !important; }
.legend .k { font-weight: 600; margin-right: 6px; }
.swatch { display:inline-block; width: 14px; height: 10px; background: var(--lost); opacity:.35; }
.k.down .swatch { background: #555; }
.k.call { color: var(--call); } .k.reply { color: var(--reply); } .k.control { color: var(--control); }
.k.error { color: var(--error); } .k.lost, .k.fault, .k.partition { color: var(--lost); }
.k.dup { color: var(--dup); } .k.reordered { color: var(--reordered); }
.k.failure, .k.failing-line { color: var(--failure); }
pre.pinned:empty { display: none; }
pre.pinned { background:#f4f6f8; border:1px solid #d5dbe1; padding:5px 8px; white-space: pre-wrap; }
#report-status { color: #999; font-size: 11px; margin-top: 24px; }
"""

_JS = r"""
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    errors.push(String(e.message));
    document.body.setAttribute('data-js-errors', errors.join(' | '));
  });
  function copyText(text, button) {
    function done(ok) {
      button.textContent = ok ? 'Copied' : 'Select the text and copy';
      setTimeout(function () { button.textContent = 'Copy'; }, 1500);
    }
    function fallback() {
      var area = document.createElement('textarea');
      area.value = text; document.body.appendChild(area); area.select();
      var ok = false; try { ok = document.execCommand('copy'); } catch (e) { ok = false; }
      document.body.removeChild(area); done(ok);
    }
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, fallback);
    } else { fallback(); }
  }
  document.querySelectorAll('button.copy').forEach(function (b) {
    b.addEventListener('click', function () {
      copyText(document.getElementById(b.getAttribute('data-target')).textContent, b);
    });
  });
  var lanes = 0, arrows = 0, svgs = document.querySelectorAll('svg.timeline');
  svgs.forEach(function (svg) {
    lanes += svg.querySelectorAll('g.lane').length;
    arrows += svg.querySelectorAll('g.arrow').length;
    var pinned = svg.parentNode.parentNode.querySelector('pre.pinned');
    svg.addEventListener('click', function (ev) {
      var g = ev.target.closest('g.arrow, g.mark, g.lane, rect.span, rect.band, g.break');
      var t = g && g.querySelector('title');
      if (t && pinned) pinned.textContent = t.textContent;
    });
  });
  var status = document.getElementById('report-status');
  status.textContent = 'rendered: ' + svgs.length + ' timelines, ' + lanes + ' lanes, ' +
      arrows + ' arrows';
  status.setAttribute('data-ready', 'yes');
  document.body.setAttribute('data-report-ready', 'yes');
})();
"""


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"{body}<div id=\"report-status\">not rendered (the page's script did not run)</div>"
            f"<script>{_JS}</script></body></html>\n")


_copy_ids = [0]


def _command_box(label: str, command: str) -> str:
    _copy_ids[0] += 1
    ident = f"cmd{_copy_ids[0]}"
    return (f'<div class="cmd"><span>{_e(label)}</span><pre id="{ident}">{_e(command)}</pre>'
            f'<button class="copy" type="button" data-target="{ident}">Copy</button></div>')


def _seed_ranges(seeds: Sequence[int]) -> str:
    out: List[str] = []
    seeds = sorted(seeds)
    i = 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        out.append(str(seeds[i]) if i == j else f"{seeds[i]}–{seeds[j]}")
        i = j + 1
    return ", ".join(out) or "none"


def _events_of(result: Any) -> List[dict]:
    """A recorded SimResult's trace as Chrome trace events (what tether.sim.write_trace writes,
    less the failure markers, which build_timeline adds from result.failures)."""
    out = []
    for item in getattr(result, "trace", None) or []:
        text = item[1] if isinstance(item, (tuple, list)) else item
        try:
            out.append(json.loads(text) if isinstance(text, str) else dict(text))
        except ValueError:
            continue
    return out


def render_sim_report(*, command: str, results: Sequence[Any], groups: Sequence[FailureGroup],
                      wall_seconds: float = 0.0, title: str = "tether.sim report",
                      notes: Sequence[str] = ()) -> str:
    """The page for one exploration: summary, failure groups (each with its shrunk run's
    timeline when one is given), and the seeds run."""
    failed = [r for r in results if not r.ok]
    b: List[str] = []
    w = b.append
    w(f"<h1>{_e(title)}</h1>")
    w(_command_box("command:", command))
    virtual = sum(float(getattr(r, "virtual_seconds", 0.0)) for r in results)
    verdict = (f'<span class="bad">{len(failed)} of {len(results)} seeds failed</span>, '
               f'{len(groups)} failure group{"s" if len(groups) != 1 else ""}' if failed else
               f'<span class="ok">No failures: all {len(results)} seeds passed.</span>')
    w(f"<p>{verdict} · virtual time {virtual:.3f} s · wall time {wall_seconds:.2f} s</p>")
    for n in notes:
        w(f'<p class="note">{_e(n)}</p>')
    if groups:
        w("<h2>Failure groups</h2>")
        w('<p>Grouped by failure kind and error text (the exception line, or what a hung worker '
          'waits on), with numbers, addresses and worker names masked. The run shown is the '
          'group\'s lowest seed, shrunk to the fewest faults that still fail the same way.</p>')
        w("<table><tr><th>#</th><th>kinds</th><th>signature</th><th>seeds</th>"
          "<th>shrunk faults</th></tr>")
        for i, g in enumerate(groups, 1):
            shown = g.seeds[:MAX_SEEDS_PER_GROUP]
            more = f" and {len(g.seeds) - len(shown)} more" if len(g.seeds) > len(shown) else ""
            w(f'<tr><td><a href="#group{i}">{i}</a></td><td>{_e(", ".join(g.kinds))}</td>'
              f"<td><code>{_e(g.signature)}</code></td><td>{len(g.seeds)}: "
              f"{_e(', '.join(map(str, shown)) + more)}</td>"
              f"<td><code>{_e(getattr(g.shrunk, 'plan', ''))}</code></td></tr>")
        w("</table>")
        for i, g in enumerate(groups, 1):
            w(f'<h2 id="group{i}">Group {i}: {_e(", ".join(g.kinds))} — seed {g.first.seed}'
              f'{f" (and {len(g.seeds) - 1} more)" if len(g.seeds) > 1 else ""}</h2>')
            w(f"<p>faults drawn: <code>{_e(g.first.plan)}</code>; shrunk to: "
              f"<code>{_e(g.shrunk.plan)}</code></p>")
            w(_command_box("replay (shrunk):", g.shrunk_replay))
            if g.shrunk_replay != g.replay:
                w(_command_box("replay (as drawn):", g.replay))
            for f in g.shrunk.failures:
                where = _failing_line(str(f.detail))
                w(f"<p><b>[{_e(f.kind)}] {_e(f.worker)}</b>"
                  f"{f' — failing line: <code>{_e(where)}</code>' if where else ''}</p>")
                w(f'<pre class="detail">{_e(_clip(str(f.detail), MAX_DETAIL_CHARS))}</pre>')
            if g.timeline is not None:
                w(render_timeline(g.timeline, ident=f"group{i}-svg"))
            else:
                w(f'<p class="note">No timeline for this group (only the first {MAX_TIMELINES} '
                  "groups are drawn); replay it with --trace or --report.</p>")
    w("<h2>Seeds run</h2>")
    ok_seeds = [r.seed for r in results if r.ok]
    w(f"<p>{len(results)} seeds; passed: {_e(_seed_ranges(ok_seeds))}</p>")
    if failed:
        w("<table><tr><th>seed</th><th>failure kinds</th><th>faults drawn</th>"
          "<th>virtual s</th><th>events</th></tr>")
        for r in failed[:MAX_SEED_ROWS]:
            w(f"<tr><td>{r.seed}</td><td class=\"bad\">{_e(', '.join(r.kinds()))}</td>"
              f"<td><code>{_e(r.plan)}</code></td><td>{r.virtual_seconds:.3f}</td>"
              f"<td>{r.events}</td></tr>")
        w("</table>")
        if len(failed) > MAX_SEED_ROWS:
            w(f'<p class="note">{len(failed) - MAX_SEED_ROWS} more failing seeds not listed.</p>')
    return _page(title, "".join(b))


def render_trace_report(doc: Any, *, title: str = "Tether trace",
                        source: str = "") -> str:
    """The page for one Chrome trace: a --trace file of tether.sim or a real run's trace
    (merged by tools/merge-traces, or one worker's)."""
    events = doc.get("traceEvents", []) if isinstance(doc, dict) else list(doc)
    other = doc.get("otherData", {}) if isinstance(doc, dict) else {}
    plan = str(other.get("plan", "")) if isinstance(other, dict) else ""
    tl = build_timeline(events, plan=plan)
    b = [f"<h1>{_e(title)}</h1>"]
    if source:
        b.append(f"<p>from <code>{_e(source)}</code></p>")
    if isinstance(other, dict) and other:
        rows = "".join(f"<tr><th>{_e(k)}</th><td><code>{_e(json.dumps(v) if not isinstance(v, str) else v)}"
                       f"</code></td></tr>" for k, v in other.items())
        b.append(f"<table>{rows}</table>")
    failures = [m for m in tl.marks if m.kind in ("failure", "failing-line")]
    if failures:
        b.append(f'<p class="bad">{len(failures)} failure marks on the trace.</p>')
    b.append(f"<p>{len(tl.lanes)} workers, {len(tl.arrows)} messages drawn, "
             f"{sum(1 for a in tl.arrows if a.kind == 'lost')} never received, span "
             f"{_e(_fmt_us(tl.end))}.</p>")
    b.append(render_timeline(tl, ident="trace-svg"))
    return _page(title, "".join(b))


def write_sim_report(path: str, *, command: str, results: Sequence[Any],
                     shrunk: Dict[int, Any], replay: Callable[[int, str], str],
                     rerun: Callable[[int, str], Any], wall_seconds: float = 0.0) -> str:
    """Groups the failed results, re-runs each group's shrunk run with a trace (`rerun(seed,
    faults)` returns a recorded SimResult) for the first MAX_TIMELINES groups, and writes the
    page to `path`. `shrunk` maps a failed seed to its shrunk result (missing: not shrunk)."""
    groups: List[FailureGroup] = []
    notes: List[str] = []
    for i, (sig, members) in enumerate(group_failures([r for r in results if not r.ok]).items()):
        first = members[0]
        small = shrunk.get(first.seed, first)
        if small is not first and failure_signature(small.failures) != sig:
            notes.append(f"seed {first.seed}: the shrunk run fails differently "
                         f"({failure_signature(small.failures)}); its group shows the run "
                         "with the faults as drawn.")
            small = first
        g = FailureGroup(sig, first.kinds(), [r.seed for r in members], first, small,
                         replay(first.seed, first.faults), replay(first.seed, small.faults))
        if i < MAX_TIMELINES:
            recorded = small if getattr(small, "trace", None) else rerun(small.seed, small.faults)
            if recorded.trace_hash != small.trace_hash:
                notes.append(f"seed {small.seed}: the traced replay differs from the run "
                             "(trace hashes differ); the timeline shows the replay.")
            g.timeline = build_timeline(_events_of(recorded), plan=recorded.plan,
                                        failures=recorded.failures,
                                        end=recorded.virtual_seconds * 1e6)
        groups.append(g)
    if len(groups) > MAX_TIMELINES:
        notes.append(f"{len(groups)} failure groups: timelines are drawn for the first "
                     f"{MAX_TIMELINES}.")
    page = render_sim_report(command=command, results=results, groups=groups,
                             wall_seconds=wall_seconds, notes=notes)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m tether.sim.report TRACE.json -o OUT.html"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tether.sim.report",
                                     description="Renders a Chrome trace (tether.sim --trace, "
                                     "TETHER_TRACE_DIR or tools/merge-traces) as one "
                                     "self-contained HTML page.")
    parser.add_argument("trace")
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        with open(args.trace, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as e:
        sys.exit(f"tether.sim.report: cannot read {args.trace}: {e}")
    page = render_trace_report(doc, title=args.title or f"Tether trace: {args.trace}",
                               source=args.trace)
    with open(args.output, "w", encoding="utf-8") as fh:
        fh.write(page)
    print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
