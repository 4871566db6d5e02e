"""Intake (prep-cut-v1 §1): the one reader of the drop folder.

Files of the drop folder are opened only here, never following a link and
never blocking (§4.5), and only regular files are read. ``Watcher`` wakes the
agent on any change in the drop folder: file events are hints, periodic
rescans the truth (§1.3). If inotify cannot be used (no watches or instances
left: ENOSPC / EMFILE), it says so and the agent runs on its periodic rescans
alone (``mode == "polling"``).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from prep_agent.core.errors import FILE_MISMATCH, FILE_TYPE, INCOMPLETE, LIMIT_EXCEEDED, Rejection
from prep_agent.core.manifest import SIGNATURE_NAME, FileEntry

log = logging.getLogger(__name__)


def open_in_inbox(inbox: Path, relpath: str) -> int:
    """Open a regular file under ``inbox`` without following any symlink.

    Every path segment is opened relative to its parent with ``O_NOFOLLOW``;
    ``O_NONBLOCK`` keeps a FIFO from hanging the agent. Raises ``Rejection``
    (INCOMPLETE if absent, FILE_TYPE if not a regular file).
    """
    segments = relpath.split("/")
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    dir_fd = os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for segment in segments[:-1]:
            fd = _open_segment(segment, flags | os.O_DIRECTORY, dir_fd, relpath)
            os.close(dir_fd)
            dir_fd = fd
        fd = _open_segment(segments[-1], flags, dir_fd, relpath)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Rejection(FILE_TYPE, f"{relpath!r} is not a regular file", transient=True)
    return fd


def _open_segment(segment: str, flags: int, dir_fd: int, relpath: str) -> int:
    try:
        return os.open(segment, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        raise Rejection(INCOMPLETE, f"{relpath!r} is missing", transient=True) from None
    except (NotADirectoryError, OSError) as exc:
        raise Rejection(
            FILE_TYPE, f"{relpath!r} cannot be opened safely ({exc.strerror})", transient=True
        ) from None


def read_inbox_file(inbox: Path, name: str, limit: int) -> bytes | None:
    """Read a small regular file of the drop folder (manifest, signature).

    Returns None if absent. Raises ``Rejection`` if it is not a regular file or
    is larger than ``limit``.
    """
    try:
        fd = open_in_inbox(inbox, name)
    except Rejection as exc:
        if exc.reason == INCOMPLETE:
            return None
        raise
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise Rejection(LIMIT_EXCEEDED, f"{name} is larger than {limit} bytes")
    return data


def precheck_inbox(inbox: Path, files: list[FileEntry]) -> None:
    """Cheap pass before copying: every file to read is there with its size.

    Raises a transient ``Rejection`` so a cut still uploading costs stats, not hashing.
    """
    for entry in files:
        try:
            st = os.lstat(inbox / entry.path)
        except (FileNotFoundError, NotADirectoryError):
            raise Rejection(INCOMPLETE, f"{entry.path!r} is missing", transient=True) from None
        if not stat.S_ISREG(st.st_mode):
            raise Rejection(FILE_TYPE, f"{entry.path!r} is not a regular file", transient=True)
        if st.st_size != entry.size:
            raise Rejection(
                FILE_MISMATCH,
                f"{entry.path!r}: {st.st_size} bytes, listed {entry.size}",
                transient=True,
            )


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
