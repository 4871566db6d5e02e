"""Health pushes survive a clock step (health-v1 §3).

A real ``prep-agent collector`` process checks the reports of an in-process
``Pusher`` whose clock the test steps: a report refused because the clock ran
an hour ahead must not hold later reports back once the clock is right again.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prep_agent.agent.journal import Journal, read_journal
from prep_agent.web.push import Pusher, load_push_key
from tests.collectorkit import CollectorProc, keygen
from tests.kit import free_port, wait_for

PERIOD = 2.0
"""The pusher's period (seconds); a refused report is retried within it."""


class SteppedClock:
    """The real clock plus an offset the test steps (as NTP or an operator would)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._offset = timedelta(0)

    def step(self, offset: timedelta) -> None:
        with self._lock:
            self._offset = offset

    def __call__(self) -> datetime:
        with self._lock:
            return datetime.now(timezone.utc) + self._offset


def _pushed_times(collector: CollectorProc, sid: str) -> list[datetime]:
    """``time`` of every report the collector accepted from ``sid``, in order."""
    db = sqlite3.connect(str(collector.home / "collector.sqlite"))
    try:
        rows = db.execute(
            "SELECT doc_time FROM report WHERE difusor = ? AND source = 'push' ORDER BY id",
            (sid,),
        ).fetchall()
    finally:
        db.close()
    return [datetime.fromisoformat(r[0]) for r in rows]


def test_pushes_recover_when_a_forward_clock_step_is_undone(tmp_path: Path) -> None:
    key = tmp_path / "report_key"
    trust = tmp_path / "difusores_allowed_signers"
    trust.write_text(keygen(key, "diario-r") + "\n")
    (tmp_path / "salida").mkdir()
    (tmp_path / "collector").mkdir()
    collector = CollectorProc(tmp_path / "collector", free_port(), tmp_path / "salida", trust)
    collector.poll = False
    clock = SteppedClock()
    journal_path = tmp_path / "journal.jsonl"

    def events(name: str) -> list[dict[str, Any]]:
        return [e for e in read_journal(journal_path) if e["event"] == name]

    def document() -> dict[str, Any]:
        return {"serviceId": "diario-r", "status": "pass", "checks": {}}

    pusher = Pusher(
        [collector.url + "/reports"],
        load_push_key(key),
        document,
        Journal(journal_path, clock),
        period=PERIOD,
        connect_timeout=1,
        read_timeout=2,
        clock=clock,
    )
    collector.start()
    pusher.start()
    try:
        wait_for(lambda: len(_pushed_times(collector, "diario-r")) >= 1, what="first report")

        clock.step(timedelta(hours=1))
        pusher.notify()
        wait_for(lambda: events("report-failing"), what="report refused while an hour ahead")
        assert "422" in events("report-failing")[0]["detail"]
        accepted = len(_pushed_times(collector, "diario-r"))

        clock.step(timedelta(0))
        back = time.monotonic()
        wait_for(lambda: events("report-restored"), timeout=4 * PERIOD, what="accepted again")
        recovered = time.monotonic() - back
        assert len(_pushed_times(collector, "diario-r")) > accepted

        # Ten seconds back after an accepted report: times still increase, no replay.
        clock.step(timedelta(seconds=-10))
        count = len(_pushed_times(collector, "diario-r"))
        wait_for(lambda: len(_pushed_times(collector, "diario-r")) >= count + 2, what="2 more")
        reasons = {r["reason"] for r in collector.api()["rejections"]}
    finally:
        pusher.stop()
        collector.stop()
    assert recovered < PERIOD + 1.0, recovered
    assert len(events("report-failing")) == 1 and reasons == {"time-window"}
    times = _pushed_times(collector, "diario-r")
    assert times == sorted(times) and len(set(times)) == len(times)
    assert all(abs((t - datetime.now(timezone.utc)).total_seconds()) < 300 for t in times)
