"""The append-only JSON-lines journal of every agent event.

One object a line: ``{"time": RFC 3339 UTC, "event": name, ...}``. It is the
input of the memoria técnica (incidents, latencies, cut timeline).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prep_agent.shared.clock import Clock, utc_now

if TYPE_CHECKING:
    from prep_agent.agent.store import Release

log = logging.getLogger(__name__)


class Journal:
    """Appends events to a JSON-lines file, each line flushed and fsynced.

    Each event's time is read from ``clock``. A line that cannot be written is
    logged instead; it never raises.
    """

    def __init__(self, path: Path, clock: Clock = utc_now) -> None:
        self.path = path
        self.clock = clock

    def write(self, event: str, strict: bool = False, **fields: Any) -> dict[str, Any]:
        """Append one event and return it as written.

        With ``strict`` (operator actions: the journal is the rollback floor's
        second witness) raises ``OSError`` instead of logging a failed write.
        """
        record = {"time": self.clock().isoformat(timespec="milliseconds")}
        record["event"] = event
        record.update(fields)
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, line.encode("utf-8"))
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if strict:
                raise
            # Losing a journal line (disk full) must never stop publication.
            log.error("journal %s not written (%s): %s", self.path, exc.strerror, line.strip())
        log.info("%s %s", event, json.dumps(fields, ensure_ascii=False))
        return record


def write_published(
    journal: Journal,
    release: Release,
    signers: tuple[str, ...],
    copied: int,
    timings_ms: dict[str, float],
    **extra: Any,
) -> None:
    """Journal ``cut-published`` for ``release``, whichever source it came from.

    The keys every reader relies on (the memoria técnica, the rollback floor,
    the rehearsal) come first, then the source's ``extra`` fields, then its
    step timings in milliseconds. Never raises (see :meth:`Journal.write`).
    """
    m = release.manifest
    fields: dict[str, Any] = {
        "sequence": m.sequence,
        "cut_time": m.cut_time_text,
        "period_seconds": m.period_seconds,
        "final": m.final,
        "manifest_sha256": release.manifest_sha256,
        "release": release.name,
        "files": len(m.files),
        "bytes": m.total_bytes,
        "bytes_copied": copied,
        "signers": list(signers),
    }
    fields.update(extra)
    fields.update((key, round(value, 3)) for key, value in timings_ms.items())
    journal.write("cut-published", **fields)


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Yield the journal's events; a torn last line (crash) is skipped."""
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record
