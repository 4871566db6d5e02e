"""One injected clock: the frame, the journal and the quarantine follow the agent's clock.

The fake clock is set on election night 2021, years before the wall clock, so a
single read of the wall clock anywhere below the agent shows up as a wrong state
(a 2021 cut is stale by the wall clock), a wrong time or a wrong folder name.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prep_agent.agent.journal import read_journal
from prep_agent.daemon import Agent
from prep_agent.web.frame import STALE_TEXT
from tests.kit import OFFSET, Institute, make_config

PERIOD = timedelta(seconds=600)
"""The cuts' ``period_seconds``; the config's ``stale_periods`` is 3."""
T0 = datetime(2021, 6, 7, 3, 0, tzinfo=timezone.utc)
"""Election night (21:00 in UTC-6): the fake clock's first reading."""


class FakeClock:
    """An aware UTC instant that only moves when the test sets it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def published_status(public: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((public / "status.json").read_text(encoding="utf-8"))
    return doc


def stale_notice(page: str) -> str:
    """The frame's interruption notice paragraph, hidden or not."""
    match = re.search(r'<p class="notice interrupted" id="stale-notice"[^>]*>[^<]*</p>', page)
    assert match, "the frame has no interruption notice"
    return match.group(0)


def assert_public(public: Path, state: str, sequence: int | None, now: datetime) -> None:
    """status.json and index.html both show ``state`` for ``sequence``, written at ``now``."""
    status = published_status(public)
    assert (status["state"], status["sequence"]) == (state, sequence)
    assert status["written_at"] == now.isoformat(timespec="seconds")
    page = (public / "index.html").read_text(encoding="utf-8")
    assert f'data-state="{state}"' in page
    notice = stale_notice(page)
    assert STALE_TEXT in notice
    assert (" hidden" not in notice) == (state == "stale"), notice


def deliver(inst: Institute, inbox: Path, sequence: int, cut_time: datetime) -> None:
    """Upload a signed cut whose times are given in UTC-6, as the institute writes them."""
    cut_time = cut_time.astimezone(OFFSET)
    files = inst.files(cut_time, sequence)
    doc = inst.manifest(files, sequence, cut_time, period_seconds=int(PERIOD.total_seconds()))
    inst.deliver(inbox, files, doc)


def test_one_agent_follows_the_injected_clock(tmp_path: Path, institute: Institute) -> None:
    config = make_config(tmp_path, institute, stale_periods=3)
    clock = FakeClock(T0)
    agent = Agent(config, clock=clock)
    public = config.public
    assert agent.step().status == "idle"
    assert_public(public, "no-cut", None, T0)

    cut1 = T0 - timedelta(minutes=10)
    deliver(institute, config.inbox, 1, cut1)
    assert agent.step().status == "published"
    assert_public(public, "current", 1, T0)

    # Just before stale_at (cut time + 3 periods) nothing changes...
    clock.now = cut1 + 3 * PERIOD - timedelta(minutes=1)
    assert agent.step().status == "idle"
    assert_public(public, "current", 1, T0)
    # ...and past it the next step rewrites the public files as stale.
    stale_seen = cut1 + 3 * PERIOD + timedelta(minutes=1)
    clock.now = stale_seen
    assert agent.step().status == "idle"
    assert_public(public, "stale", 1, stale_seen)

    cut2_seen = stale_seen + timedelta(minutes=1)
    clock.now = cut2_seen
    deliver(institute, config.inbox, 2, cut2_seen - timedelta(minutes=1))
    assert agent.step().status == "published"
    assert_public(public, "current", 2, cut2_seen)

    # A cut from the future by the agent's clock (not by the wall clock) is refused.
    rejected_at = cut2_seen + timedelta(minutes=5, microseconds=250000)
    clock.now = rejected_at
    deliver(institute, config.inbox, 3, rejected_at.replace(microsecond=0) + timedelta(hours=1))
    outcome = agent.step()
    assert outcome.status == "rejected" and outcome.rejection is not None
    assert outcome.rejection.reason == "time-invalid"
    assert [p.name for p in config.quarantine.iterdir()] == ["20210607T032700.250000Z-3"]

    events = list(read_journal(config.journal_file))
    moments = {(e["event"], e.get("sequence")): datetime.fromisoformat(e["time"]) for e in events}
    assert moments[("cut-published", 1)] == T0
    assert moments[("cut-published", 2)] == cut2_seen
    assert moments[("cut-rejected", 3)] == rejected_at
    assert all(T0 <= datetime.fromisoformat(e["time"]) <= rejected_at for e in events), events
