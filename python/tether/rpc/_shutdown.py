"""The barrier a graceful shutdown() passes first (as PyTorch's _wait_all_workers), and what keeps
shutdown from waiting in silence.

The barrier: the worker with the lowest id leads. Every other worker sends it one call,
``_barrier_join``, that the leader answers (without holding a thread: async_execution) once every
worker has joined, or with the error that ended the barrier. The leader also keeps one call open
to each other worker, ``_barrier_watch``, answered when that worker leaves its barrier. So a peer
whose process is gone fails, at once and by name, the shutdown of whoever waits on it: the agent
fails a call to a lost peer as soon as its connection drops (kUnavailable), the leader sees it on
its watch and ends the barrier with an error naming the worker, which every follower's join
then carries.

The reports: while a worker waits in the barrier, every ``REPORT_INTERVAL`` seconds (default 5;
$TETHER_SHUTDOWN_REPORT_INTERVAL; 0 turns them off) it logs a warning on the ``tether.rpc``
logger (on stderr unless logging is configured otherwise) naming the workers that have not called
shutdown(), its own oldest calls in flight to them (from the worker summary), and what those
workers say they are running (their threads' current lines and their calls in flight), asked with
RPCs of their own bounded by ``REPORT_QUERY_TIMEOUT``. A follower asks the leader who is missing
and what the leader heard from them. The queries are never waited on: a report shows what has come
back by its time, and says who did not answer.

After a shutdown (any kind), threads still running a handler's user code were left behind by
the runtime (its thread pool stops within a bound, $TETHER_SHUTDOWN_JOIN_TIMEOUT, 5 s by default,
so that the process can exit): report_left_behind() logs their Python stacks.

Inside tether.sim neither the watches nor the reports are used (the simulator reports hangs
itself, with the line every worker waits on).
"""
import logging
import os
import re
import sys
import threading
import time
import traceback
from typing import Dict, List, Optional

import torch

from tether import _C

from . import functions

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
# How often the barrier looks at its deadline and its reports (what it waits for wakes it).
_STEP = 0.1

# The barrier of the current run: shutdown() increments it once done (every worker of a run has
# called shutdown() as often as the others before it).
generation = 0


class _Generation:
    """One barrier as seen by this worker."""

    def __init__(self):
        self.arrived = set()  # Leader: names of the workers that have joined.
        self.joins: List[torch.futures.Future] = []  # Leader: the followers' pending joins.
        self.outcome: Optional[str] = None  # Leader: None while open, "" passed, else the error.
        self.watches: List[torch.futures.Future] = []  # Answered when this worker leaves.
        self.left: Optional[str] = None  # Why this worker left this barrier (None: not yet).
        self.reports: Dict[str, str] = {}  # Leader: what missing workers said of themselves.
        self.wake = threading.Event()  # Set when something changed (a join arrived).


_lock = threading.Lock()
_generations: Dict[int, _Generation] = {}


def _gen(gen: int) -> _Generation:
    # Callers hold _lock.
    g = _generations.get(gen)
    if g is None:
        g = _generations[gen] = _Generation()
    return g


def _done_future(value) -> torch.futures.Future:
    fut = torch.futures.Future()
    fut.set_result(value)
    return fut


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

@functions.async_execution
def _barrier_join(gen: int, name: str, world_size: int) -> torch.futures.Future:
    """On the leader: `name` has called shutdown(). Answered when every worker has (True), or
    with the error that ended the barrier."""
    fut = torch.futures.Future()
    with _lock:
        g = _gen(gen)
        g.arrived.add(name)
        outcome = g.outcome
        if outcome is None:
            g.joins.append(fut)
        g.wake.set()
    if outcome is not None:
        if outcome:
            fut.set_exception(RuntimeError(outcome))
        else:
            fut.set_result(True)
    return fut


@functions.async_execution
def _barrier_watch(gen: int) -> torch.futures.Future:
    """On any worker: answered (with why) once this worker has left barrier `gen`; fails with
    kUnavailable on the caller if this worker's process is gone first."""
    with _lock:
        if generation > gen:
            return _done_future("it has shut down")
        g = _gen(gen)
        if g.left is not None:
            return _done_future(g.left)
        fut = torch.futures.Future()
        g.watches.append(fut)
        return fut


def _barrier_status(gen: int):
    """On the leader: (the names of the workers that have not joined barrier `gen`, what they
    said of themselves when last asked)."""
    from . import api

    me = api._self_info
    names = set(api._workers_by_name)
    with _lock:
        g = _generations.get(gen)
        arrived = set(g.arrived) if g is not None else set()
        reports = dict(g.reports) if g is not None else {}
    missing = sorted(names - arrived)
    if me is not None and me.name in missing:
        reports[me.name] = _describe_self()  # The leader itself has not called shutdown().
    return missing, {n: reports[n] for n in missing if n in reports}


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


def _calls_in_flight(to=None, skip_younger_than=None) -> List[str]:
    """This worker's oldest calls in flight (from its summary), to the workers `to` if given,
    leaving out, per worker, one call at most `skip_younger_than` seconds old (the barrier's
    own watch on it)."""
    try:
        summary = _C.agent_summary()
    except Exception:  # noqa: B902 (shut down meanwhile)
        return []
    calls = []
    for line in summary.splitlines():
        m = _IN_FLIGHT_RE.match(line)
        if m and (to is None or m.group(3) in to):
            calls.append((m.group(1), m.group(2), m.group(3), m.group(4), _seconds(m.group(4))))
    if skip_younger_than is not None:
        # The summary lists the oldest first: the watch is the youngest of each worker's.
        for name in set(c[2] for c in calls):
            for i in range(len(calls) - 1, -1, -1):
                c = calls[i]
                if c[2] == name and c[1] == "PYTHON_CALL" and c[4] is not None and \
                        c[4] <= skip_younger_than:
                    del calls[i]
                    break
    return [f"#{rid} {kind} to {name}, for "
            f"{f'{age:.1f}s' if age is not None else text}"
            for rid, kind, name, text, age in calls]


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


# --- The waits ---------------------------------------------------------------------------------

class _Reporter:
    """Logs, every `interval` seconds, which workers the barrier waits for and what they run.
    poll() is called from the barrier's wait loop and never blocks: the queries for a report are
    sent shortly before it and whatever has come back by then is shown."""

    def __init__(self, me, leader, gen, interval):
        self.me, self.leader, self.gen = me, leader, gen
        self.interval = interval
        self.start = time.monotonic()
        self.next_report = self.start + interval
        self.lead_time = min(1.0, interval / 2)
        self.queried_for = None
        self.describes: Dict[str, torch.futures.Future] = {}  # Leader.
        self.status: Optional[torch.futures.Future] = None  # Follower: asks the leader.

    def poll(self, now, missing=None):
        if self.interval <= 0:
            return
        if now >= self.next_report - self.lead_time and self.queried_for != self.next_report:
            self.queried_for = self.next_report
            self._query(missing)
        if now >= self.next_report:
            try:
                text = self._text(now, missing)
            except Exception as e:  # noqa: B902 (a report must never break the barrier)
                text = f"tether: shutdown() on {self.me.name} is waiting ({e!r})"
            try:
                logger.warning("%s", text)
            except Exception:  # noqa: B902 (a raising log handler must not break it either)
                pass
            while self.next_report <= now:
                self.next_report += self.interval

    def _ask(self, to, func, args=()):
        from . import api

        try:
            return api.rpc_async(to, func, args=args, timeout=REPORT_QUERY_TIMEOUT)
        except Exception as e:  # noqa: B902
            fut = torch.futures.Future()
            fut.set_exception(e)
            return fut

    def _query(self, missing):
        if self.me == self.leader:
            for name in missing or ():
                if name == self.me.name:
                    continue
                old = self.describes.get(name)
                if old is None or old.done():
                    self.describes[name] = self._ask(name, _describe_self)
        elif self.status is None or self.status.done():
            self.status = self._ask(self.leader.name, _barrier_status, (self.gen,))

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

    def _text(self, now, missing):
        waited = f"{now - self.start:.1f}s"
        lines = []
        if self.me == self.leader:
            reports = {}
            for name in missing:
                if name == self.me.name:
                    continue
                value, why = self._answer(self.describes.get(name), name)
                reports[name] = value if value is not None else why
            with _lock:
                _gen(self.gen).reports.update(reports)
            lines.append(
                f"tether: shutdown() on {self.me.name} has waited {waited} for "
                f"{', '.join(missing)} to call shutdown() (the leader waits for every worker)"
            )
        else:
            answer, why = self._answer(self.status, f"the leader {self.leader.name}")
            if answer is not None:
                missing, reports = answer
                missing = list(missing)
                if missing:
                    lines.append(
                        f"tether: shutdown() on {self.me.name} has waited {waited} for "
                        f"{', '.join(missing)} to call shutdown() (as the leader "
                        f"{self.leader.name} sees it)"
                    )
                else:
                    lines.append(
                        f"tether: shutdown() on {self.me.name} has waited {waited} for the "
                        f"leader {self.leader.name}, which has seen every worker call shutdown()"
                    )
                    missing = [self.leader.name]
            else:
                missing, reports = [self.leader.name], {}
                lines.append(
                    f"tether: shutdown() on {self.me.name} has waited {waited} for the leader "
                    f"{self.leader.name} to see every worker call shutdown(); {why}"
                )
        # The leader's own watch on each missing worker is one of its calls: not shown.
        skip = now - self.start + 1.0 if self.me == self.leader else None
        calls = _calls_in_flight(set(missing), skip_younger_than=skip)
        lines.append(
            f"  {self.me.name}'s calls in flight to them: {'; '.join(calls) if calls else 'none'}"
        )
        for name in missing:
            if name in reports:
                text = reports[name].replace("\n", "\n    ")
                lines.append(f"  {name} says:\n    {text}")
        return "\n".join(lines)


def _wait_step(now, deadline, sim):
    """How long the barrier's loop sleeps (woken early by what it waits for)."""
    if sim:  # Event-driven in virtual time: no polling steps for the simulator.
        return None if deadline is None else max(0.0, deadline - now)
    return _STEP if deadline is None else max(0.0, min(_STEP, deadline - now))


def _fail_joins(g: _Generation, outcome: str):
    with _lock:
        g.outcome = outcome
        joins, g.joins = g.joins, []
    for fut in joins:
        if outcome:
            fut.set_exception(RuntimeError(outcome))
        else:
            fut.set_result(True)


def _lead(gen, me, workers, deadline, sim, interval):
    from . import api

    names = {w.name for w in workers.values()}
    with _lock:
        g = _gen(gen)
        g.arrived.add(me.name)
    watches = {}
    if not sim:
        for w in workers.values():
            if w != me:
                fut = api.rpc_async(w, _barrier_watch, args=(gen,), timeout=0)
                fut.add_done_callback(lambda _: g.wake.set())
                watches[w.name] = fut
    reporter = _Reporter(me, me, gen, 0 if sim else interval)
    try:
        while True:
            with _lock:
                missing = sorted(names - g.arrived)
                g.wake.clear()
            if not missing:
                break
            for name in missing:
                fut = watches.get(name)
                if fut is not None and fut.done():
                    error = _error_of(fut)
                    if error is not None:
                        raise RuntimeError(
                            f"RPC shutdown failed: worker {name} is gone before calling "
                            f"shutdown() ({_first_line(error)})"
                        )
                    raise RuntimeError(
                        f"RPC shutdown failed: worker {name} left without a graceful "
                        f"shutdown ({fut.value()})"
                    )
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise RuntimeError(
                    "RPC shutdown timed out waiting for every worker to call shutdown() "
                    f"(missing: {', '.join(missing)})"
                )
            reporter.poll(now, missing)
            g.wake.wait(_wait_step(now, deadline, sim))
    except BaseException as e:
        _fail_joins(g, str(e) or "RPC shutdown failed on the leader")
        raise
    _fail_joins(g, "")


def _follow(gen, me, leader, world_size, deadline, sim, interval):
    from . import api

    join = api.rpc_async(leader, _barrier_join, args=(gen, me.name, world_size), timeout=0)
    joined = threading.Event()
    join.add_done_callback(lambda _: joined.set())
    reporter = _Reporter(me, leader, gen, 0 if sim else interval)
    while not join.done():
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise RuntimeError(f"RPC shutdown timed out waiting for {leader.name} to proceed")
        reporter.poll(now)
        joined.wait(_wait_step(now, deadline, sim))
    error = _error_of(join)
    if error is not None:
        text = str(error)
        told = _TOLD_RE.search(text)
        if told:  # The leader ended the barrier: its reason, without the remote traceback.
            text = f"{told.group(1)} (the leader {leader.name} ended the barrier)"
        else:  # The join itself failed: the leader is gone.
            text = f"RPC shutdown failed: {_first_line(error)}"
        raise RuntimeError(text)


# The leader's error as its remote traceback ends: "RuntimeError: RPC shutdown failed: ...".
_TOLD_RE = re.compile(r"^RuntimeError: (RPC shutdown (?:failed|timed out).*)$", re.MULTILINE)


def wait_all_workers(timeout: float, me, workers_by_id) -> None:
    """The barrier (see the module's doc). `timeout` seconds if > 0 bounds it. Raises
    RuntimeError naming the workers if it times out or a worker is gone."""
    gen = generation
    leader = workers_by_id[min(workers_by_id)]
    deadline = time.monotonic() + timeout if timeout > 0 else None
    sim = bool(_C.sim_in_worker())
    interval = REPORT_INTERVAL
    outcome = "it has passed its barrier"
    try:
        if me == leader:
            _lead(gen, me, workers_by_id, deadline, sim, interval)
        else:
            _follow(gen, me, leader, len(workers_by_id), deadline, sim, interval)
    except BaseException as e:
        outcome = f"its shutdown failed: {_first_line(e)}"
        raise
    finally:
        leave(outcome, gen)


def leave(why: str, gen: Optional[int] = None) -> None:
    """This worker leaves barrier `gen` (default: the current one): answers the watches on it and,
    if it led the barrier and followers still wait in it, fails their joins naming it (before the
    agent stops: an async_execution call left unanswered would be answered by its dropped
    responder only after the agent is gone)."""
    from . import api

    gen = generation if gen is None else gen
    name = api._self_info.name if api._self_info is not None else "the leader"
    with _lock:
        g = _gen(gen)
        if g.left is None:
            g.left = why
        if g.outcome is None:  # joins that come later are answered at once
            g.outcome = f"RPC shutdown failed: the shutdown leader {name} left the barrier ({g.left})"
        outcome = g.outcome
        watches, g.watches = g.watches, []
        joins, g.joins = g.joins, []
    for fut in watches:
        fut.set_result(g.left)
    for fut in joins:
        if outcome:
            fut.set_exception(RuntimeError(outcome))
        else:
            fut.set_result(True)


def finish() -> None:
    """Called once shutdown() is over: the next run's barrier has a new generation."""
    global generation
    with _lock:
        _generations.pop(generation, None)
        generation += 1


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
