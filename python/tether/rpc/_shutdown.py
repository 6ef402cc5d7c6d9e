"""What keeps a graceful shutdown() from waiting in silence. The barrier itself is the agent's
(core/agent.h: every worker calls shutdown(), then each deletes its user RRefs, then no work may
be left anywhere; a worker gone before every worker joined fails it at once, by name, on every
worker). This module only reports on it.

The reports: while a worker waits in shutdown(), every ``REPORT_INTERVAL`` seconds (default 5;
$TETHER_SHUTDOWN_REPORT_INTERVAL; 0 turns them off) it logs a warning on the ``tether.rpc``
logger (on stderr unless logging is configured otherwise). Before every worker has joined: the
workers that have not called shutdown(), this worker's own oldest calls in flight to them (from
the worker summary), and what those workers say they are running (their threads' current lines
and their calls in flight), asked with RPCs of their own bounded by ``REPORT_QUERY_TIMEOUT``. A
follower asks the leader who is missing and what the leader heard from them. After the join:
what this worker still runs. The queries are never waited on: a report shows what has come back
by its time, and says who did not answer.

After a shutdown (any kind), threads still running a handler's user code were left behind by
the runtime (its thread pool stops within a bound, $TETHER_SHUTDOWN_JOIN_TIMEOUT, 5 s by default,
so that the process can exit): report_left_behind() logs their Python stacks.

Inside tether.sim there are no reports (the simulator reports hangs itself, with the line every
worker waits on).
"""
import logging
import os
import re
import sys
import threading
import traceback
from typing import Dict, List, Optional

import torch

from tether import _C

logger = logging.getLogger("tether.rpc")


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} wants a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"{name} wants a number of seconds >= 0, got {value!r}")
    return seconds


# Seconds between two reports while shutdown() waits for other workers; 0: none.
REPORT_INTERVAL = _env_seconds("TETHER_SHUTDOWN_REPORT_INTERVAL", 5.0)
# Bound on each RPC that gathers a report (a worker whose threads are all busy cannot answer).
REPORT_QUERY_TIMEOUT = 2.0

# Leader: what the missing workers said of themselves when last asked (by name).
_reports_lock = threading.Lock()
_reports: Dict[str, str] = {}


def _error_of(fut: torch.futures.Future) -> Optional[BaseException]:
    """The error of a completed future, or None if it has a value."""
    try:
        fut.wait()
    except Exception as e:  # noqa: B902 (the error a call ended with)
        return e
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- Remote functions (called by name on other workers) ----------------------------------------

def _barrier_status():
    """On the leader: (the names of the workers that have not called shutdown(), what they said
    of themselves when last asked)."""
    from . import api

    me = api._self_info
    try:
        progress = _C.shutdown_progress()
    except Exception:  # noqa: B902 (RPC is not running here any more)
        return [], {}
    if not progress["pending"]:
        # The leader itself has not called shutdown() yet.
        name = me.name if me is not None else progress["leader"]
        return [name], {name: _describe_self()}
    missing = list(progress["not_joined"])
    with _reports_lock:
        reports = {n: _reports[n] for n in missing if n in _reports}
    return missing, reports


_TETHER_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_THREADING_FILE = getattr(threading, "__file__", "") or ""


def _user_frame(stack: traceback.StackSummary) -> str:
    """The innermost frame outside tether and threading, as 'file:line in func: source'."""
    for fs in reversed(stack):
        if fs.filename.startswith(_TETHER_DIR) or fs.filename == _THREADING_FILE:
            continue
        source = f": {fs.line.strip()}" if fs.line else ""
        return f"{os.path.basename(fs.filename)}:{fs.lineno} in {fs.name}{source}"
    fs = stack[-1]
    return f"{os.path.basename(fs.filename)}:{fs.lineno} in {fs.name}"


def _handler_threads(exclude=None):
    """(thread ident, description) of every thread running a Python RPC handler's user code."""
    from . import api, internal

    udf_code = internal._run_udf.__code__
    out = []
    for ident, frame in sys._current_frames().items():
        if ident == exclude:
            continue
        f, udf_frame = frame, None
        while f is not None:
            if f.f_code is udf_code:
                udf_frame = f
                break
            f = f.f_back
        if udf_frame is None:
            continue
        what = "a function"
        caller = None
        try:
            local = udf_frame.f_locals
            udf = local.get("udf")
            if udf:
                func = udf[0]
                what = getattr(func, "__qualname__", None) or repr(func)
                module = getattr(func, "__module__", None)
                if module:
                    what = f"{module}.{what}"
            caller = local.get("caller")
        except Exception:  # noqa: B902 (best effort: a description)
            pass
        info = api._workers_by_id.get(caller) if caller is not None else None
        by = f" for {info.name}" if info is not None else ""
        where = _user_frame(traceback.extract_stack(frame))
        out.append((ident, f"handler running {what}{by}, at {where}"))
    return out


_IN_FLIGHT_RE = re.compile(r"^\s*#(\d+) (\S+) to (\S+), for (\S+)\s*$")
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d*)?)(h|ms|us|ns|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _seconds(duration: str) -> Optional[float]:
    """Seconds in an absl::FormatDuration text ("1.5s", "2m3s", "150ms"), None if not one."""
    parts = _DURATION_PART_RE.findall(duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def _calls_in_flight(to=None) -> List[str]:
    """This worker's oldest calls in flight (from its summary), to the workers `to` if given."""
    try:
        summary = _C.agent_summary()
    except Exception:  # noqa: B902 (shut down meanwhile)
        return []
    calls = []
    for line in summary.splitlines():
        m = _IN_FLIGHT_RE.match(line)
        if m and (to is None or m.group(3) in to):
            age = _seconds(m.group(4))
            calls.append(f"#{m.group(1)} {m.group(2)} to {m.group(3)}, for "
                         f"{f'{age:.1f}s' if age is not None else m.group(4)}")
    return calls


def _describe_self() -> str:
    """What this worker is running: its main thread's line, its handlers' lines, its calls in
    flight. Runs on the worker described (a pool thread when asked by RPC)."""
    me = threading.get_ident()
    lines = []
    main = threading.main_thread().ident
    frame = sys._current_frames().get(main)
    if frame is not None and main != me:
        lines.append(f"main thread at {_user_frame(traceback.extract_stack(frame))}")
    for _, text in _handler_threads(exclude=me):
        lines.append(text)
    calls = _calls_in_flight()
    lines.append(f"its calls in flight: {'; '.join(calls) if calls else 'none'}")
    return "\n".join(lines)


# --- The reports -------------------------------------------------------------------------------

class Reporter:
    """The `on_wait(elapsed)` hook _C.shutdown() calls about every 100 ms while the barrier is
    pending: logs a report every `interval` seconds. Never blocks: the queries for a report are
    sent shortly before it and whatever has come back by then is shown."""

    def __init__(self, me, interval):
        self.me, self.interval = me, interval
        self.next_report = interval
        self.lead_time = min(1.0, interval / 2)
        self.queried_for = None
        self.describes: Dict[str, torch.futures.Future] = {}  # Leader.
        self.status: Optional[torch.futures.Future] = None  # Follower: asks the leader.

    def __call__(self, elapsed: float) -> None:
        if self.interval <= 0 or elapsed < self.next_report - self.lead_time:
            return
        try:
            progress = _C.shutdown_progress()
        except Exception:  # noqa: B902 (stopped meanwhile)
            return
        if not progress["pending"]:
            return
        leader = progress["leader"]
        missing = list(progress["not_joined"])
        if self.queried_for != self.next_report:
            self.queried_for = self.next_report
            self._query(progress, leader, missing)
        if elapsed < self.next_report:
            return
        try:
            text = self._text(elapsed, progress, leader, missing)
        except Exception as e:  # noqa: B902 (a report must never break the shutdown)
            text = f"tether: shutdown() on {self.me.name} is waiting ({e!r})"
        try:
            logger.warning("%s", text)
        except Exception:  # noqa: B902 (a raising log handler must not break it either)
            pass
        while self.next_report <= elapsed:
            self.next_report += self.interval

    def _ask(self, to, func, args=()):
        from . import api

        try:
            return api.rpc_async(to, func, args=args, timeout=REPORT_QUERY_TIMEOUT)
        except Exception as e:  # noqa: B902
            fut = torch.futures.Future()
            fut.set_exception(e)
            return fut

    def _query(self, progress, leader, missing):
        if progress["joined"]:
            return
        if self.me.name == leader:
            for name in missing:
                if name == self.me.name:
                    continue
                old = self.describes.get(name)
                if old is None or old.done():
                    self.describes[name] = self._ask(name, _describe_self)
        elif self.status is None or self.status.done():
            self.status = self._ask(leader, _barrier_status)

    @staticmethod
    def _answer(fut, who):
        if fut is None:
            return None, f"{who} was not asked yet"
        if not fut.done():
            return None, f"{who} has not answered (its threads may all be busy)"
        error = _error_of(fut)
        if error is not None:
            return None, f"{who} did not answer: {_first_line(error)}"
        return fut.value(), None

    def _text(self, elapsed, progress, leader, missing):
        waited = f"{elapsed:.1f}s"
        me = self.me.name
        if progress["aborting"]:
            return (f"tether: shutdown() on {me} has waited {waited}: it is ending the barrier "
                    f"(a worker is gone) and waits briefly for the others to hear why")
        if progress["joined"]:
            busy = [n for n in progress["busy"] if n != me]
            elsewhere = f"; work in flight on {', '.join(busy)} too" if busy else ""
            return (f"tether: shutdown() on {me} has waited {waited} for the work still in "
                    f"flight to finish (every worker has called shutdown(){elsewhere})\n"
                    f"{_describe_self()}")
        lines = []
        if me == leader:
            reports = {}
            for name in missing:
                if name == me:
                    continue
                value, why = self._answer(self.describes.get(name), name)
                reports[name] = value if value is not None else why
            with _reports_lock:
                _reports.update(reports)
            lines.append(
                f"tether: shutdown() on {me} has waited {waited} for "
                f"{', '.join(missing)} to call shutdown() (the leader waits for every worker)"
            )
        else:
            answer, why = self._answer(self.status, f"the leader {leader}")
            if answer is not None:
                missing, reports = answer
                missing = list(missing)
                if missing:
                    lines.append(
                        f"tether: shutdown() on {me} has waited {waited} for "
                        f"{', '.join(missing)} to call shutdown() (as the leader {leader} "
                        f"sees it)"
                    )
                else:
                    lines.append(
                        f"tether: shutdown() on {me} has waited {waited} for the leader "
                        f"{leader}, which has seen every worker call shutdown()"
                    )
                    missing = [leader]
            else:
                missing, reports = [leader], {}
                lines.append(
                    f"tether: shutdown() on {me} has waited {waited} for the leader {leader} "
                    f"to see every worker call shutdown(); {why}"
                )
        calls = _calls_in_flight(set(missing))
        lines.append(f"  {me}'s calls in flight to them: {'; '.join(calls) if calls else 'none'}")
        for name in missing:
            if name in reports:
                text = reports[name].replace("\n", "\n    ")
                lines.append(f"  {name} says:\n    {text}")
        return "\n".join(lines)


def reporter(me) -> Optional[Reporter]:
    """The on_wait hook for a graceful shutdown of worker `me`; None when reports are off or
    inside tether.sim."""
    if me is None or REPORT_INTERVAL <= 0 or _C.sim_in_worker():
        return None
    with _reports_lock:
        _reports.clear()
    return Reporter(me, REPORT_INTERVAL)


def report_left_behind() -> int:
    """Logs the threads still running an RPC handler's user code (after a shutdown: the ones the
    runtime left behind so the process can exit); returns how many."""
    try:
        stuck = _handler_threads(exclude=threading.get_ident())
    except Exception:  # noqa: B902 (at exit, modules may be half gone)
        return 0
    if stuck:
        logger.warning(
            "tether: %d RPC handler thread(s) still running user code after shutdown were left "
            "behind (the process can exit; they never run another task):\n%s",
            len(stuck),
            "\n".join(f"  thread {ident:#x}: {text}" for ident, text in stuck),
        )
    return len(stuck)
