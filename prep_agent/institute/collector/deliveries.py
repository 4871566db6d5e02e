"""The distribution's records in the collector's SQLite database.

Every delivery attempt (target, sequence, start, end, files and bytes sent,
result, one-line error), per target the last acknowledged cut (its file hashes,
so the next cut sends only what changed) and when it was published, and the
cuts the institute distributed (the sequence history its local check uses).
A connection of its own to the collector's file: WAL lets ``prep-agent
distribute`` write while ``prep-agent collector`` serves the dashboard.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prep_agent.institute.collector.sqlite import SQLiteFile

DELIVERED = "delivered"
"""The target holds the whole cut, signature last."""
FAILED = "failed"
"""The attempt failed; ``error`` says why in one line."""
SUPERSEDED = "superseded"
"""A newer cut replaced this one before the target received it."""
MAX_ATTEMPTS_KEPT = 200_000
"""Attempt rows kept (30 difusores, 150 cuts and a few retries fit many times)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivery_attempt (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    difusor TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    files INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    result TEXT NOT NULL,
    error TEXT
);
CREATE INDEX IF NOT EXISTS delivery_attempt_difusor ON delivery_attempt (difusor, id);
CREATE TABLE IF NOT EXISTS delivery_target (
    difusor TEXT PRIMARY KEY,
    acked_sequence INTEGER,
    acked_files TEXT,
    ready_at REAL,
    delivered_at REAL,
    published_sequence INTEGER,
    published_at REAL,
    last_error TEXT,
    last_error_at REAL,
    failing_since REAL
);
CREATE TABLE IF NOT EXISTS distributed_cut (
    sequence INTEGER PRIMARY KEY,
    manifest_sha256 TEXT NOT NULL,
    cut_time TEXT NOT NULL,
    ready_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt to one target."""

    difusor: str
    sequence: int
    started: float
    ended: float
    files: int
    bytes: int
    result: str
    error: str | None = None


@dataclass(frozen=True)
class TargetRecord:
    """What the institute knows of one target's deliveries."""

    difusor: str
    acked_sequence: int | None
    acked_files: dict[str, str]
    ready_at: float | None
    delivered_at: float | None
    published_sequence: int | None
    published_at: float | None
    last_error: str | None
    last_error_at: float | None
    failing_since: float | None

    @property
    def delivery_latency(self) -> float | None:
        """Seconds from "cut ready" to the target holding it (last acknowledged cut)."""
        if self.ready_at is None or self.delivered_at is None:
            return None
        return round(self.delivered_at - self.ready_at, 3)

    @property
    def publish_latency(self) -> float | None:
        """Seconds from delivered to shown in its status.json (same cut only)."""
        if self.delivered_at is None or self.published_at is None:
            return None
        if self.published_sequence != self.acked_sequence:
            return None
        return round(self.published_at - self.delivered_at, 3)


@dataclass(frozen=True)
class DistributedCut:
    """The newest cut the institute sent out."""

    sequence: int
    manifest_sha256: str
    cut_time: str
    ready_at: float


class DeliveryLog(SQLiteFile):
    """The delivery tables of the collector's database (thread-safe)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    def last_distributed(self) -> DistributedCut | None:
        """The highest sequence ever sent out, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT sequence, manifest_sha256, cut_time, ready_at FROM distributed_cut "
                "ORDER BY sequence DESC LIMIT 1"
            ).fetchone()
        return DistributedCut(*row) if row else None

    def record_distributed(self, cut: DistributedCut) -> None:
        """Remember a cut as sent out (kept if already known)."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO distributed_cut VALUES (?, ?, ?, ?)",
                (cut.sequence, cut.manifest_sha256, cut.cut_time, cut.ready_at),
            )

    def target(self, difusor: str) -> TargetRecord:
        """The record of one target (empty when it never received a cut)."""
        with self._lock:
            row = self._db.execute(
                "SELECT difusor, acked_sequence, acked_files, ready_at, delivered_at, "
                "published_sequence, published_at, last_error, last_error_at, failing_since "
                "FROM delivery_target WHERE difusor = ?",
                (difusor,),
            ).fetchone()
        if row is None:
            return TargetRecord(difusor, None, {}, None, None, None, None, None, None, None)
        return TargetRecord(row[0], row[1], json.loads(row[2] or "{}"), *row[3:])

    def acked_sequence(self, difusor: str) -> int | None:
        """The sequence of the last cut ``difusor`` acknowledged (without reading its files)."""
        with self._lock:
            row = self._db.execute(
                "SELECT acked_sequence FROM delivery_target WHERE difusor = ?", (difusor,)
            ).fetchone()
        return None if row is None else row[0]

    def targets(self) -> dict[str, TargetRecord]:
        """Every target's record, by difusor id."""
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT difusor FROM delivery_target")]
        return {sid: self.target(sid) for sid in ids}

    def record_attempt(
        self, attempt: Attempt, files: dict[str, str] | None = None, ready_at: float | None = None
    ) -> None:
        """Record one attempt; a delivered one also becomes the acknowledged cut
        (``files``: path → SHA-256 of everything the target now holds)."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO delivery_attempt (difusor, sequence, started, ended, files, bytes, "
                "result, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    attempt.difusor,
                    attempt.sequence,
                    attempt.started,
                    attempt.ended,
                    attempt.files,
                    attempt.bytes,
                    attempt.result,
                    (attempt.error or "")[:300] or None,
                ),
            )
            db.execute(
                "INSERT OR IGNORE INTO delivery_target (difusor) VALUES (?)", (attempt.difusor,)
            )
            if attempt.result == DELIVERED:
                db.execute(
                    "UPDATE delivery_target SET acked_sequence = ?, acked_files = ?, ready_at = ?, "
                    "delivered_at = ?, failing_since = NULL WHERE difusor = ?",
                    (
                        attempt.sequence,
                        json.dumps(files or {}, separators=(",", ":")),
                        ready_at,
                        attempt.ended,
                        attempt.difusor,
                    ),
                )
            elif attempt.result == FAILED:
                db.execute(
                    "UPDATE delivery_target SET last_error = ?, last_error_at = ?, "
                    "failing_since = COALESCE(failing_since, ?) WHERE difusor = ?",
                    ((attempt.error or "")[:300], attempt.ended, attempt.started, attempt.difusor),
                )
            db.execute(
                "DELETE FROM delivery_attempt "
                "WHERE id <= (SELECT MAX(id) FROM delivery_attempt) - ?",
                (MAX_ATTEMPTS_KEPT,),
            )

    def record_published(self, difusor: str, sequence: int, at: float) -> None:
        """The target's status.json showed ``sequence`` at ``at``."""
        with self._tx() as db:
            db.execute(
                "UPDATE delivery_target SET published_sequence = ?, published_at = ? "
                "WHERE difusor = ?",
                (sequence, at, difusor),
            )

    def attempts(self, difusor: str | None = None, limit: int = 1000) -> list[Attempt]:
        """The newest attempts (of one target, or all), oldest first."""
        where, args = ("WHERE difusor = ?", (difusor, limit)) if difusor else ("", (limit,))
        with self._lock:
            rows = self._db.execute(
                "SELECT difusor, sequence, started, ended, files, bytes, result, error "
                f"FROM delivery_attempt {where} ORDER BY id DESC LIMIT ?",
                args,
            ).fetchall()
        return [Attempt(*r) for r in reversed(rows)]


def target_summary(record: TargetRecord | None) -> dict[str, Any]:
    """The delivery fields of one dashboard row (all None when never attempted)."""
    if record is None:
        record = TargetRecord("", None, {}, None, None, None, None, None, None, None)
    return {
        "delivered_sequence": record.acked_sequence,
        "delivery_latency": record.delivery_latency,
        "published_sequence": record.published_sequence,
        "publish_latency": record.publish_latency,
        "delivery_error": record.last_error if record.failing_since is not None else None,
        "delivery_failing_since": record.failing_since,
    }
