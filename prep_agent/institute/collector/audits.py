"""The collector audits every difusor's public copy after every cut (issue 17).

Once per signed cut and difusor, as soon as the difusor reports it publishes
that cut (or ``[audit] after`` seconds after the cut was recorded, whichever
comes first), the collector runs the same audit as ``prep-agent audit``
against the difusor's public site: sampled (``sample`` random files plus the
entry page and every CSV and zip), and in full on every ``full_every``-th
audit of that difusor. Each result is a row of the ``audits`` table of the
collector's SQLite file. A copy found altered is an incident: the difusor has
been failing since its first altered audit in a row (this counts toward the
``unlink_periods`` flag) and it leaves the good-standing list at once.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prep_agent.core.allowed_signers import AllowedSigner
from prep_agent.institute.audit.check import (
    ALTERED,
    INTACT,
    STALE,
    UNREACHABLE,
    AuditOptions,
    AuditReport,
    audit,
)
from prep_agent.institute.collector.board import Board
from prep_agent.institute.collector.config import AuditSettings, DifusorEntry
from prep_agent.institute.collector.sqlite import SQLiteFile

log = logging.getLogger(__name__)

COPY_LABELS = {
    INTACT: "copia íntegra",
    ALTERED: "copia alterada",
    STALE: "desactualizada",
    UNREACHABLE: "sin respuesta",
}
"""Dashboard text of each audit verdict."""
SETTLED = (INTACT, ALTERED)
"""Verdicts after which a cut is not audited again on that difusor."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS audits (
    id INTEGER PRIMARY KEY,
    difusor TEXT NOT NULL,
    at REAL NOT NULL,
    expected INTEGER,
    sequence INTEGER,
    verdict TEXT NOT NULL,
    full INTEGER NOT NULL,
    checked INTEGER NOT NULL,
    listed INTEGER NOT NULL,
    findings TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audits_by_difusor ON audits (difusor, id);
"""


@dataclass(frozen=True)
class AuditRecord:
    """The latest audit of one difusor, and since when its copy is altered."""

    difusor: str
    at: float
    expected: int | None
    sequence: int | None
    verdict: str
    full: bool
    checked: int
    listed: int
    findings: tuple[str, ...]
    altered_since: float | None


class AuditLog(SQLiteFile):
    """The ``audits`` table: one row per audit."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA)

    def record(
        self, difusor: str, report: AuditReport, expected: int | None, full: bool, at: float
    ) -> None:
        """Store one audit's result (its findings as one-line texts, at most 100)."""
        lines = [f.line() for f in report.findings[:100]]
        with self._tx() as db:
            db.execute(
                "INSERT INTO audits (difusor, at, expected, sequence, verdict, full, checked,"
                " listed, findings) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    difusor,
                    at,
                    expected,
                    report.sequence,
                    report.verdict,
                    int(full),
                    report.checked,
                    report.listed,
                    json.dumps(lines, ensure_ascii=False),
                ),
            )

    def latest(self) -> dict[str, AuditRecord]:
        """The latest audit of every audited difusor."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT difusor, at, expected, sequence, verdict, full, checked, listed, findings"
                " FROM audits WHERE id IN (SELECT MAX(id) FROM audits GROUP BY difusor)"
            ).fetchall()
            since = {
                difusor: at
                for difusor, at in db.execute(
                    "SELECT a.difusor, MIN(a.at) FROM audits a WHERE a.verdict = ? AND a.id >"
                    " COALESCE((SELECT MAX(b.id) FROM audits b WHERE b.difusor = a.difusor"
                    " AND b.verdict = ?), 0) GROUP BY a.difusor",
                    (ALTERED, INTACT),
                )
            }
        return {
            r[0]: AuditRecord(
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                bool(r[5]),
                r[6],
                r[7],
                tuple(json.loads(r[8])),
                since.get(r[0]) if r[4] == ALTERED else None,
            )
            for r in rows
        }

    def counts(self, difusor: str, expected: int) -> tuple[int, bool, float | None]:
        """How many audits ``difusor`` had, whether cut ``expected`` is settled on it,
        and when it was last audited."""
        with self._tx() as db:
            total, last = db.execute(
                "SELECT COUNT(*), MAX(at) FROM audits WHERE difusor = ?", (difusor,)
            ).fetchone()
            settled = db.execute(
                "SELECT 1 FROM audits WHERE difusor = ? AND expected = ? AND verdict IN (?, ?)",
                (difusor, expected, *SETTLED),
            ).fetchone()
        return int(total), settled is not None, last


def copy_summary(record: AuditRecord | None) -> dict[str, Any]:
    """The board's audit fields of one difusor (``copy_failing_since`` is popped by
    the board: the start of its altered run)."""
    if record is None:
        return {}
    return {
        "copy": record.verdict,
        "copy_label": COPY_LABELS.get(record.verdict, record.verdict),
        "copy_detail": record.findings[0][:300] if record.findings else None,
        "copy_checked": f"{record.checked}/{record.listed}",
        "copy_audited_at": datetime.fromtimestamp(record.at, timezone.utc).isoformat(
            timespec="seconds"
        ),
        "copy_failing_since": record.altered_since,
    }


def site_url(entry: DifusorEntry) -> str | None:
    """The difusor's public site (where its frame and status.json are)."""
    if entry.status_url:
        return re.sub(r"status\.json$", "", entry.status_url)
    found = re.match(r"https?://[^/\s]+", entry.health_url or "")
    return found.group(0) + "/" if found else None


class Auditor:
    """Runs the due audits on a small pool of its own (``tick`` from the poll loop)."""

    def __init__(
        self,
        settings: AuditSettings,
        difusores: Sequence[DifusorEntry],
        signers: Callable[[], tuple[AllowedSigner, ...]],
        audits: AuditLog,
        poll_interval: float,
        clock: Callable[[], datetime],
    ) -> None:
        self.settings = settings
        self.targets = [(d, url) for d in difusores if d.enabled and (url := site_url(d))]
        self.signers = signers
        self.audits = audits
        self.retry_after = poll_interval
        self.clock = clock
        self.pool = ThreadPoolExecutor(max_workers=max(1, settings.workers))
        self.inflight: dict[str, Future[None]] = {}

    def due(self, board: Board, now: float) -> list[tuple[DifusorEntry, str, int, bool]]:
        """(difusor, url, expected sequence, full) of every audit to run now."""
        latest = board.latest
        if latest is None:
            return []
        rows = {r.service_id: r for r in board.rows}
        found = []
        for entry, url in self.targets:
            row = rows.get(entry.service_id)
            published = row is not None and (row.sequence or 0) >= latest.sequence
            if not published and now - latest.recorded_at < self.settings.after:
                continue
            total, settled, last = self.audits.counts(entry.service_id, latest.sequence)
            if settled or (last is not None and now - last < self.retry_after):
                continue
            found.append((entry, url, latest.sequence, total % self.settings.full_every == 0))
        return found

    def tick(self, board: Board) -> None:
        """Start every due audit not already running."""
        for entry, url, expected, full in self.due(board, board.now.timestamp()):
            running = self.inflight.get(entry.service_id)
            if running is None or running.done():
                self.inflight[entry.service_id] = self.pool.submit(
                    self.run, entry.service_id, url, expected, full
                )

    def run(self, service_id: str, url: str, expected: int, full: bool) -> None:
        """Audit one difusor and record the result (never raises)."""
        s = self.settings
        options = AuditOptions(
            signers=self.signers(),
            threshold=s.threshold,
            election=s.election,
            sample=None if full else s.sample,
            expect_sequence=expected,
            timeout=s.timeout,
            concurrency=s.concurrency,
        )
        try:
            report = audit(url, options, self.clock())
        except Exception:  # a bad URL or a bug: logged, the next tick tries again
            log.error("audit of %s failed", service_id, exc_info=True)
            return
        self.audits.record(service_id, report, expected, full, self.clock().timestamp())

    def stop(self) -> None:
        """Wait for the audits in flight (each ends by its timeouts) and stop the pool."""
        self.pool.shutdown(wait=True, cancel_futures=True)
