"""Incidents and the cut timeline, read from the agent's journal.

Stale windows (prep-cut-v1 §6): the published cut is stale when no new cut
arrived for ``stale_periods`` × ``period_seconds`` after its signed
``cut_time``. The journal's ``cut-published`` events carry ``cut_time`` but not
the period nor ``final``; the report uses the event's ``period_seconds`` and
``final`` when present, otherwise ``--period`` (default 600 s) and not final.
A stale window starts at ``cut_time + stale_periods × period`` and ends when
the next cut is published; after the last cut it ends at the end of the
operation window (flagged ``after_last_cut``: no interruption if it was final).

Agent downtime: from ``agent-stopped`` (or, after a crash, the last event
before an ``agent-started`` not preceded by ``agent-stopped``, the starting
agent's own ``server-listening`` left out) to the next ``agent-started``.

A clock set behind: the journal is appended in the order things happened, each
line stamped by the agent's wall clock. A line ``CLOCK_STEP_SECONDS`` or more
older than the newest line before it means that clock was behind (an agent
started with a wrong clock, or a clock set back); its lines, until one is as
new as that newest line again, are moved forward by the step (so the first of
them lands right after the last line written before it: the earliest it can
have happened) and keep the journal's order; the step is listed among the
other events (``clock-behind``, with its size and the first line's own time).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


@dataclass(frozen=True)
class CutRow:
    """One published cut of the timeline."""

    sequence: int
    cut_time: datetime
    received: datetime
    published: datetime
    total_ms: float
    release: str

    @property
    def delay_s(self) -> float:
        """Seconds from the signed cut time to publication."""
        return (self.published - self.cut_time).total_seconds()


@dataclass(frozen=True)
class Window:
    """An interval of an incident (stale publication or agent down)."""

    start: datetime
    end: datetime
    note: str = ""

    @property
    def seconds(self) -> float:
        """Duration in seconds."""
        return (self.end - self.start).total_seconds()


@dataclass
class Incidents:
    """Everything the report needs from the journal."""

    events: int = 0
    cuts: list[CutRow] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    stale: list[Window] = field(default_factory=list)
    downtime: list[Window] = field(default_factory=list)
    other: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0

    def latency_stats(self) -> dict[str, float | None]:
        """p50/p95/max of the agent's own publication time and of cut-time→published."""
        totals = sorted(c.total_ms for c in self.cuts)
        delays = sorted(c.delay_s for c in self.cuts)
        return {
            "total_ms_p50": _pct(totals, 50),
            "total_ms_p95": _pct(totals, 95),
            "total_ms_max": totals[-1] if totals else None,
            "delay_s_p50": _pct(delays, 50),
            "delay_s_p95": _pct(delays, 95),
            "delay_s_max": delays[-1] if delays else None,
        }


OTHER_EVENTS = frozenset(
    (
        "agent-error",
        "agent-recovered",
        "trust-error",
        "stamp-warning",
        "watcher-lost",
        "watcher-rearmed",
        "operator-rollback",
        "operator-reset-sequence",
        "source-error",
        "source-recovered",
    )
)
"""Journal events listed as incidents as they are."""
STARTING = frozenset(("server-listening",))
"""Events an agent journals while it starts, before ``agent-started``."""
CLOCK_STEP_SECONDS = 2.0
"""How much older than the newest line before it a journal line must be to count as
written by a clock set behind (lines of concurrent threads differ by milliseconds)."""


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def parse_time(text: Any) -> datetime | None:
    """A journal RFC 3339 time (aware), or None."""
    if not isinstance(text, str):
        return None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def read_incidents(
    events: Iterable[dict[str, Any]],
    operation: tuple[datetime, datetime],
    period_seconds: int = 600,
    stale_periods: int = 3,
) -> Incidents:
    """Build the incident report from journal events (in file order)."""
    inc = Incidents()
    timed = []
    for e in events:
        t = parse_time(e.get("time"))
        if t is None or not isinstance(e.get("event"), str):
            inc.bad_lines += 1
            continue
        timed.append((t, e))
    timed, steps = on_one_clock(timed)
    timed.sort(key=lambda te: te[0])
    inc.events = len(timed)
    inc.other.extend(steps)
    published: list[tuple[datetime, dict[str, Any]]] = []
    for t, e in timed:
        name = e["event"]
        if name == "cut-published":
            row = _cut_row(t, e)
            if row is not None:
                inc.cuts.append(row)
                published.append((t, e))
        elif name == "cut-rejected":
            fields = {k: e.get(k) for k in ("sequence", "reason", "detail")}
            inc.rejected.append({"time": t, **fields})
        elif name in OTHER_EVENTS:
            detail = {k: v for k, v in e.items() if k not in ("time", "event")}
            inc.other.append({"time": t, "event": name, "detail": detail})
    inc.stale = stale_windows(published, operation, period_seconds, stale_periods)
    inc.downtime = downtime_windows(timed, operation)
    return inc


def on_one_clock(
    timed: list[tuple[datetime, dict[str, Any]]],
) -> tuple[list[tuple[datetime, dict[str, Any]]], list[dict[str, Any]]]:
    """The events (in journal order) with the lines of a clock set behind moved
    forward by its step (see the module docstring); and one ``clock-behind``
    event per step."""
    moved: list[tuple[datetime, dict[str, Any]]] = []
    steps: list[dict[str, Any]] = []
    newest: datetime | None = None
    shift = timedelta(0)
    tolerance = timedelta(seconds=CLOCK_STEP_SECONDS)
    for t, e in timed:
        if newest is not None and shift and t >= newest - tolerance:
            shift = timedelta(0)  # the clock is right again
        if newest is not None and not shift and t < newest - tolerance:
            shift = newest - t
            steps.append({"time": newest, "event": "clock-behind", "detail": {
                "seconds": round(shift.total_seconds(), 1),
                "journal_time": t.isoformat(timespec="milliseconds"), "lines": 0}})  # fmt: skip
        if shift:
            steps[-1]["detail"]["lines"] += 1
        else:
            newest = t if newest is None else max(newest, t)
        moved.append((t + shift, e))
    return moved, steps


def _cut_row(t: datetime, e: dict[str, Any]) -> CutRow | None:
    cut_time = parse_time(e.get("cut_time"))
    seq = e.get("sequence")
    if cut_time is None or not isinstance(seq, int):
        return None
    since = e.get("since_seen_ms")
    received = t - timedelta(milliseconds=float(since)) if isinstance(since, (int, float)) else t
    total = e.get("total_ms")
    return CutRow(
        sequence=seq,
        cut_time=cut_time,
        received=received,
        published=t,
        total_ms=float(total) if isinstance(total, (int, float)) else 0.0,
        release=str(e.get("release", "")),
    )


def stale_windows(
    published: list[tuple[datetime, dict[str, Any]]],
    operation: tuple[datetime, datetime],
    period_seconds: int,
    stale_periods: int,
) -> list[Window]:
    """The intervals in which the published cut was stale (see the module docstring)."""
    windows = []
    for i, (_, e) in enumerate(published):
        if e.get("final") is True:
            continue
        cut_time = parse_time(e.get("cut_time"))
        assert cut_time is not None
        period = e.get("period_seconds", period_seconds)
        if not isinstance(period, int) or period <= 0:
            period = period_seconds
        start = cut_time + timedelta(seconds=stale_periods * period)
        last = i + 1 == len(published)
        end = operation[1] if last else published[i + 1][0]
        start, end = max(start, operation[0]), min(end, operation[1])
        if start < end:
            windows.append(Window(start, end, "after_last_cut" if last else ""))
    return windows


def downtime_windows(
    timed: list[tuple[datetime, dict[str, Any]]], operation: tuple[datetime, datetime]
) -> list[Window]:
    """Intervals in which the agent was not running, clipped to the operation window."""
    windows = []
    previous: tuple[datetime, str] | None = None
    down_since: tuple[datetime, str] | None = None
    for t, e in timed:
        name = e["event"]
        if name == "agent-stopped":
            down_since = (t, "stopped")
        elif name == "agent-started":
            if down_since is None and previous is not None:
                down_since = (previous[0], "crash")
            if down_since is not None:
                start, end = max(down_since[0], operation[0]), min(t, operation[1])
                if start < end:
                    windows.append(Window(start, end, down_since[1]))
            down_since = None
        if name not in STARTING:
            previous = (t, name)
    if down_since is not None and down_since[0] < operation[1]:
        windows.append(Window(max(down_since[0], operation[0]), operation[1], down_since[1]))
    return windows
