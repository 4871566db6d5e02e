"""The collector's SQLite store: difusores' latest reports, bounded history,
rejection counters and the cuts the institute signed.

One connection shared by the web threads and the poller, serialized by a lock;
WAL mode so ``collector --record-cut`` can write from another process.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from prep_agent.core.manifest import Manifest
from prep_agent.institute.collector.sqlite import SQLiteFile
from prep_agent.institute.collector.verify import Report

PRUNE_EVERY = 100
"""Reports inserted between two trims of the history to ``history_rows``."""
MAX_SIGNED_CUTS = 5000
"""Signed cuts remembered (an election day has about 150)."""
MAX_SENDER_ROWS = 200
"""Rejection rows kept for unverified senders, the most recent first: anyone can
send from many addresses, and each (reason, address) is one row."""

_REJECTION_TABLE = """
CREATE TABLE IF NOT EXISTS rejection (
    reason TEXT NOT NULL,
    difusor TEXT NOT NULL,
    sender TEXT NOT NULL DEFAULT '',
    count INTEGER NOT NULL,
    last_at REAL NOT NULL,
    last_detail TEXT,
    PRIMARY KEY (reason, difusor, sender)
)"""
"""Refused pushes: ``difusor`` when the signature verified, else ``sender``."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS difusor (
    id TEXT PRIMARY KEY,
    first_seen REAL NOT NULL,
    last_push_time TEXT,
    last_report_at REAL,
    last_source TEXT,
    last_doc TEXT,
    fail_since REAL,
    poll_at REAL,
    poll_error TEXT
);
CREATE TABLE IF NOT EXISTS report (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    difusor TEXT NOT NULL,
    received_at REAL NOT NULL,
    source TEXT NOT NULL,
    status TEXT,
    sequence INTEGER,
    cut_time TEXT,
    doc_time TEXT
);
CREATE INDEX IF NOT EXISTS report_difusor ON report (difusor, id);
CREATE TABLE IF NOT EXISTS signed_cut (
    sequence INTEGER PRIMARY KEY,
    election TEXT NOT NULL,
    cut_time TEXT NOT NULL,
    signed_at TEXT NOT NULL,
    period_seconds INTEGER NOT NULL,
    final INTEGER NOT NULL,
    recorded_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class DifusorRecord:
    """What the store knows of one difusor."""

    service_id: str
    first_seen: float
    last_report_at: float | None
    last_source: str | None
    last_doc: dict[str, Any] | None
    fail_since: float | None
    poll_at: float | None
    poll_error: str | None


@dataclass(frozen=True)
class SignedCut:
    """A cut the institute signed, as read from its manifest."""

    sequence: int
    election: str
    cut_time: str
    signed_at: str
    period_seconds: int
    final: bool
    recorded_at: float


def _create_rejection_table(db: sqlite3.Connection) -> None:
    """Create ``rejection``; one from before senders were recorded is rebuilt with the
    ``sender`` column in its key (SQLite cannot change a primary key in place)."""
    db.execute("BEGIN IMMEDIATE")  # a --record-cut process may open it at the same time
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(rejection)")}
        old = bool(columns) and "sender" not in columns
        if old:
            db.execute("ALTER TABLE rejection RENAME TO rejection_before_senders")
        db.execute(_REJECTION_TABLE)
        if old:
            db.execute(
                "INSERT INTO rejection (reason, difusor, count, last_at, last_detail) "
                "SELECT reason, difusor, count, last_at, last_detail "
                "FROM rejection_before_senders"
            )
            db.execute("DROP TABLE rejection_before_senders")
        db.execute("COMMIT")
    except sqlite3.Error:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def check_value(doc: dict[str, Any], key: str) -> Any:
    """``observedValue`` of the first element of ``checks[key]``, or None."""
    checks = doc.get("checks")
    items = checks.get(key) if isinstance(checks, dict) else None
    if isinstance(items, list) and items and isinstance(items[0], dict):
        return items[0].get("observedValue")
    return None


class CollectorDatabase(SQLiteFile):
    """The collector's database (thread-safe)."""

    def __init__(self, path: Path, history_rows: int = 100_000) -> None:
        self.history_rows = history_rows
        self._inserted = 0
        super().__init__(path, _SCHEMA)

    def _migrate(self, db: sqlite3.Connection) -> None:
        _create_rejection_table(db)

    def register(self, service_ids: list[str], now: datetime) -> None:
        """Make sure every registered difusor has a row."""
        with self._tx() as db:
            db.executemany(
                "INSERT OR IGNORE INTO difusor (id, first_seen) VALUES (?, ?)",
                [(sid, now.timestamp()) for sid in service_ids],
            )

    def accept_push(
        self, service_id: str, check: Callable[[datetime | None], Report], now: datetime
    ) -> Report:
        """Run ``check`` with the time of the last push accepted from ``service_id``
        and record its report, atomically (two concurrent pushes cannot both pass
        the replay check). Raises what ``check`` raises."""
        with self._tx() as db:
            row = db.execute(
                "SELECT last_push_time FROM difusor WHERE id = ?", (service_id,)
            ).fetchone()
            last = datetime.fromisoformat(row[0]) if row and row[0] else None
            report = check(last)
            db.execute(
                "UPDATE difusor SET last_push_time = ? WHERE id = ?",
                (report.time.isoformat(), service_id),
            )
            self._record(db, report.service_id, report.doc, "push", now)
        return report

    def record_poll(self, service_id: str, doc: dict[str, Any], now: datetime) -> None:
        """Record a document polled from the difusor's /health."""
        with self._tx() as db:
            db.execute(
                "UPDATE difusor SET poll_at = ?, poll_error = NULL WHERE id = ?",
                (now.timestamp(), service_id),
            )
            self._record(db, service_id, doc, "poll", now)

    def record_poll_error(self, service_id: str, error: str, now: datetime) -> None:
        """Record that polling the difusor failed (not a report)."""
        with self._tx() as db:
            db.execute(
                "UPDATE difusor SET poll_at = ?, poll_error = ? WHERE id = ?",
                (now.timestamp(), error[:300], service_id),
            )

    def _record(
        self, db: sqlite3.Connection, sid: str, doc: dict[str, Any], source: str, now: datetime
    ) -> None:
        status = doc.get("status") if isinstance(doc.get("status"), str) else None
        sequence = check_value(doc, "cut:sequence")
        if not isinstance(sequence, int) or isinstance(sequence, bool):
            sequence = None
        cut_time = check_value(doc, "cut:time")
        ts = now.timestamp()
        db.execute(
            "UPDATE difusor SET last_report_at = ?, last_source = ?, last_doc = ?, "
            "fail_since = CASE WHEN ? = 'fail' THEN COALESCE(fail_since, ?) ELSE NULL END "
            "WHERE id = ?",
            (ts, source, json.dumps(doc, ensure_ascii=False), status, ts, sid),
        )
        db.execute(
            "INSERT INTO report (difusor, received_at, source, status, sequence, cut_time, "
            "doc_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                sid,
                ts,
                source,
                status,
                sequence,
                cut_time if isinstance(cut_time, str) else None,
                str(doc.get("time"))[:40],
            ),
        )
        self._inserted += 1
        if self._inserted % PRUNE_EVERY == 0:
            db.execute(
                "DELETE FROM report WHERE id <= (SELECT MAX(id) FROM report) - ?",
                (self.history_rows,),
            )

    def count_rejection(
        self, reason: str, service_id: str, detail: str, now: datetime, sender: str = ""
    ) -> None:
        """Count one refused push under the difusor ``service_id`` if its signature
        verified, else (``service_id`` "") under ``sender``, the client's address;
        only the :data:`MAX_SENDER_ROWS` most recent sender rows are kept."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO rejection (reason, difusor, sender, count, last_at, last_detail) "
                "VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (reason, difusor, sender) DO UPDATE "
                "SET count = count + 1, last_at = excluded.last_at, "
                "last_detail = excluded.last_detail",
                (reason, service_id, sender, now.timestamp(), detail[:300]),
            )
            if sender:
                db.execute(
                    "DELETE FROM rejection WHERE sender != '' AND rowid NOT IN (SELECT rowid "
                    "FROM rejection WHERE sender != '' ORDER BY last_at DESC LIMIT ?)",
                    (MAX_SENDER_ROWS,),
                )

    def rejections(self) -> list[dict[str, Any]]:
        """Every rejection counter: reason, difusor (None if unverified), sender (None
        if verified), count, last time and detail."""
        with self._lock:
            rows = self._db.execute(
                "SELECT reason, difusor, sender, count, last_at, last_detail FROM rejection "
                "ORDER BY reason, difusor, sender"
            ).fetchall()
        return [
            {
                "reason": r[0],
                "serviceId": r[1] or None,
                "sender": r[2] or None,
                "count": r[3],
                "last": datetime.fromtimestamp(r[4], timezone.utc).isoformat(timespec="seconds"),
                "last_ts": r[4],
                "detail": r[5],
            }
            for r in rows
        ]

    def difusores(self) -> list[DifusorRecord]:
        """Every difusor row."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, first_seen, last_report_at, last_source, last_doc, fail_since, "
                "poll_at, poll_error FROM difusor ORDER BY id"
            ).fetchall()
        return [
            DifusorRecord(r[0], r[1], r[2], r[3], json.loads(r[4]) if r[4] else None, *r[5:])
            for r in rows
        ]

    def history(self, service_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The newest ``limit`` reports of one difusor, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT received_at, source, status, sequence, cut_time, doc_time FROM report "
                "WHERE difusor = ? ORDER BY id DESC LIMIT ?",
                (service_id, limit),
            ).fetchall()
        keys = ("received_at", "source", "status", "sequence", "cut_time", "time")
        return [dict(zip(keys, r)) for r in rows]

    def report_count(self) -> int:
        """Rows in the report history."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM report").fetchone()[0])

    def record_cut(self, manifest: Manifest, now: datetime) -> bool:
        """Remember a signed cut; False if its sequence was already known."""
        with self._tx() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO signed_cut VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    manifest.sequence,
                    manifest.election,
                    manifest.cut_time_text,
                    manifest.signed_at.isoformat(),
                    manifest.period_seconds,
                    int(manifest.final),
                    now.timestamp(),
                ),
            )
            db.execute(
                "DELETE FROM signed_cut WHERE sequence <= (SELECT MAX(sequence) FROM signed_cut)"
                " - ?",
                (MAX_SIGNED_CUTS,),
            )
            return cursor.rowcount == 1

    def signed_cuts(self) -> list[SignedCut]:
        """The signed cuts known, by sequence."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sequence, election, cut_time, signed_at, period_seconds, final, "
                "recorded_at FROM signed_cut ORDER BY sequence"
            ).fetchall()
        return [SignedCut(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]

    def known_sequences(self) -> set[int]:
        """Sequences of the signed cuts already recorded."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT sequence FROM signed_cut")}
