"""One SQLite file of the collector, shared by its tables' owners (thread-safe)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prep_agent.core.errors import ConfigError


class SQLiteFile:
    """A WAL-mode SQLite connection with a lock; ``schema`` is applied on open."""

    def __init__(self, path: Path, schema: str) -> None:
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), timeout=10, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(schema)
            self._migrate(self._db)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open database {path}: {exc}") from None

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring an older file up to date (nothing by default)."""

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._db.close()
