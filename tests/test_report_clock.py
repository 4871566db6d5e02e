"""The memoria técnica of an agent whose wall clock was set behind (the
rehearsal's clock-skew fault: libfaketime, 900 s) and of a crashed agent: the
journal's order is kept, the lines of the clock set behind are moved forward
onto the night's timeline, the step is listed, and downtime is measured from
the events around it (real report code, a journal as the agent writes it).
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from prep_agent.report.incidents import read_incidents

START = datetime(2026, 6, 2, 20, 0, tzinfo=timezone.utc)
OP = (START - timedelta(minutes=1), START + timedelta(minutes=10))


def at(seconds: float) -> str:
    return (START + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def started(seconds: float) -> list[dict[str, Any]]:
    """What an agent journals as it starts."""
    return [
        {"time": at(seconds), "event": "server-listening", "address": "0.0.0.0:8080"},
        {"time": at(seconds + 0.01), "event": "agent-started", "watcher": "inotify"},
    ]


def published(seconds: float, sequence: int) -> dict[str, Any]:
    return {"time": at(seconds), "event": "cut-published", "sequence": sequence,
            "cut_time": at(seconds - 5), "period_seconds": 600}  # fmt: skip


@pytest.mark.core
def test_the_lines_of_a_clock_set_behind_keep_their_place_in_the_night() -> None:
    skew = -900.0
    events = [
        *started(0),
        published(10, 1),
        {"time": at(20), "event": "agent-stopped"},
        # restarted with its clock 900 s behind: its lines are 15 minutes "early"
        *started(21 + skew),
        {
            "time": at(22 + skew),
            "event": "cut-rejected",
            "reason": "time-invalid",
            "detail": "signed_at is in the future",
            "sequence": 2,
        },  # fmt: skip
        {"time": at(25 + skew), "event": "agent-stopped"},
        *started(26),
        published(27, 3),
    ]
    inc = read_incidents(events, OP)
    (rejected,) = inc.rejected
    assert OP[0] <= rejected["time"] <= OP[1]
    assert START + timedelta(seconds=20) < rejected["time"] < START + timedelta(seconds=26)
    (step,) = inc.other
    assert step["event"] == "clock-behind" and step["time"] == START + timedelta(seconds=20)
    assert step["detail"] == {"seconds": 899.0, "journal_time": at(21 + skew), "lines": 4}
    assert [c.sequence for c in inc.cuts] == [1, 3]
    down = [(w.start, w.end, w.note) for w in inc.downtime]
    # stopped at 20 s, up (behind) at 20.01 s, stopped at 24 s, up again at 26.01 s
    assert down == [
        (START + timedelta(seconds=20), START + timedelta(seconds=20.01), "stopped"),
        (START + timedelta(seconds=24), START + timedelta(seconds=26.01), "stopped"),
    ]


@pytest.mark.core
def test_a_crash_lasts_from_the_last_line_before_it_not_from_the_restarts_own() -> None:
    events = [*started(0), published(10, 1), *started(15), published(16, 2)]
    inc = read_incidents(events, OP)
    assert [(w.start, w.end, w.note) for w in inc.downtime] == [
        (START + timedelta(seconds=10), START + timedelta(seconds=15.01), "crash")
    ]
    assert inc.other == []  # lines milliseconds apart are no clock step
