"""Intake (prep-cut-v1 §1.3): file events as hints, periodic rescans as the truth.

``Watcher`` wakes the agent on any change in the drop folder. If inotify cannot
be used (no watches or instances left: ENOSPC / EMFILE), it says so and the
agent runs on its periodic rescans alone (``mode == "polling"``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from prep_agent.core.manifest import SIGNATURE_NAME

log = logging.getLogger(__name__)


class _Wake(FileSystemEventHandler):  # type: ignore[misc]
    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        paths = (event.src_path, getattr(event, "dest_path", ""))
        if any(str(p).endswith(SIGNATURE_NAME) for p in paths):
            # The signature is uploaded last (§1.2): act at once, no quiet period.
            self._watcher.signature.set()
        self._watcher.wake.set()


class Watcher:
    """Sets ``wake`` on drop-folder events; falls back to polling on failure."""

    def __init__(self, inbox: Path) -> None:
        self.inbox = inbox
        self.wake = threading.Event()
        self.signature = threading.Event()
        self.mode = "polling"
        self.failure: str | None = None
        self._observer: Any | None = None

    def start(self) -> None:
        """Start the inotify observer, or record why polling is used instead."""
        observer = Observer()
        try:
            observer.schedule(_Wake(self), str(self.inbox), recursive=True)
            observer.start()
        except OSError as exc:
            self.failure = f"inotify unavailable ({exc.strerror or exc}); polling the drop folder"
            log.warning("%s", self.failure)
            return
        self._observer = observer
        self.mode = "inotify"

    def alive(self) -> bool:
        """False if the observer thread died (then rescans still find cuts)."""
        return self._observer is None or bool(self._observer.is_alive())

    def stop(self) -> None:
        """Stop and join the observer thread."""
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def wait(self, timeout: float, quiet: float = 0.05) -> bool:
        """Wait for an event or the timeout; True if woken by an event.

        After an event, waits until ``quiet`` seconds pass with no further
        event (at most one rescan interval), so bursts coalesce; an event on
        the signature file returns at once.
        """
        woke = self.wake.wait(timeout)
        deadline = time.monotonic() + timeout
        while woke and time.monotonic() < deadline and not self.signature.is_set():
            self.wake.clear()
            if not self.wake.wait(quiet):
                break
        self.wake.clear()
        self.signature.clear()
        return woke


@dataclass
class Pending:
    """A signature seen in the drop folder whose cut is not yet decided."""

    signature_sha256: str
    first_seen: float
    last_reason: str = ""

    def settled(self, now: float, settle_timeout: float) -> bool:
        """True once the cut has had ``settle_timeout`` seconds to arrive."""
        return now - self.first_seen >= settle_timeout
