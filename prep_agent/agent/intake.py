"""Intake (prep-cut-v1 §1): the one reader of the drop folder.

``read_delivery`` reads a delivery's signature and manifest; ``open_in_inbox``
opens the files they list, never following a link and never blocking, and
only if they are regular files (§4.5). ``Watcher`` wakes the agent on any
change in the drop folder: file events are hints, periodic rescans the truth
(§1.3). If inotify cannot be used (no watches or instances left: ENOSPC /
EMFILE), it says so and the agent runs on its periodic rescans alone
(``mode == "polling"``). A watch lost because the folder was replaced, deleted
or mounted over is reported the same way until it is re-armed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from prep_agent.core.errors import (
    FILE_MISMATCH,
    FILE_TYPE,
    INCOMPLETE,
    LIMIT_EXCEEDED,
    Error,
    Rejection,
)
from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Limits
from prep_agent.core.verify import MAX_SIGNATURE_BYTES, Decision, Published

log = logging.getLogger(__name__)

HINT_BYTES = 64 * 1024
"""``sequence_hint`` looks at no more than this head of a rejected manifest: its
bytes are not trusted, and parsing 32 MiB of hostile JSON takes ~900 MB."""
STABLE_SECONDS = 1.0
"""A manifest changed less than this long before it was looked at has no identity
(``FileIdentity``): a rewrite within one tick of the file system's clock would not
change its times, so it is read again on the next attempt."""

FileIdentity = tuple[int, int, int, int, int]
"""Device, inode, size, mtime and ctime (ns) of a file: what any rewrite changes."""
_SEQUENCE_RE = re.compile(rb'(?<!\\)"sequence"\s*:\s*(\d{1,16})(?![\d.eE])')


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


def read_inbox_file(inbox: Path, name: str, limit: int) -> bytes:
    """Read a small regular file of the drop folder (manifest, signature).

    Raises ``Rejection``: INCOMPLETE if absent, FILE_TYPE if not a regular
    file, LIMIT_EXCEEDED if larger than ``limit``.
    """
    with os.fdopen(open_in_inbox(inbox, name), "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise Rejection(LIMIT_EXCEEDED, f"{name} is larger than {limit} bytes")
    return data


def precheck_inbox(inbox: Path, files: list[FileEntry]) -> None:
    """Cheap pass before copying: every file to read is there with its size.

    Raises a transient ``Rejection`` so a cut still uploading costs stats, not hashing.
    """
    base = str(inbox)
    for entry in files:
        try:
            st = os.lstat(f"{base}/{entry.path}")  # no Path per file: 200,000 of them
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


def file_identity(st: os.stat_result, now: float) -> FileIdentity | None:
    """The identity of a file from its ``stat``, or None if it changed less than
    ``STABLE_SECONDS`` before ``now`` (wall-clock seconds)."""
    if now - st.st_ctime_ns / 1e9 < STABLE_SECONDS:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Delivery:
    """The signature and manifest of the drop folder, as read at one instant.

    ``signature_id`` is None when there is no signature file: nothing was
    delivered. ``problem`` is the rejection that reading the delivery gave (a
    file missing, not a regular file or too large); then the bytes that could
    not be read are None. ``manifest_identity`` is the manifest file's identity
    when it was opened (None if it just changed); ``unchanged`` says the manifest
    was not read because it is the one the caller already judged.
    """

    signature_id: str | None
    signature: bytes | None
    manifest: bytes | None
    problem: Rejection | None
    manifest_identity: FileIdentity | None = None
    unchanged: bool = False

    def contents(self) -> tuple[bytes, bytes]:
        """The manifest and signature bytes.

        Raises ``problem`` if they could not be read, ``Error`` if the
        manifest was skipped (the signature was already decided).
        """
        if self.problem is not None:
            raise self.problem
        if self.manifest is None or self.signature is None:
            raise Error(f"{MANIFEST_NAME} of an already decided signature was not read")
        return self.manifest, self.signature


def read_delivery(
    inbox: Path,
    limits: Limits,
    decided: str | None = None,
    judged: tuple[str, FileIdentity] | None = None,
) -> Delivery:
    """Read the signature, then the manifest it signs, from the drop folder.

    The one reading of a delivery that the daemon and ``prep-agent verify``
    share, so that both give a cut the same reason. The manifest is not read
    when the signature cannot be, when the signature's identity equals
    ``decided`` (a cut already judged), nor when the signature's identity and
    the manifest file's identity equal ``judged`` (``unchanged``: the same files
    give the same verdict). A missing manifest beside its signature is
    INCOMPLETE (transient), like any other missing file: the signature is
    uploaded last (§1.2), so the delivery is still arriving or was left
    unfinished (§1.3, §4.5). The delivery's own faults are returned in
    ``problem``, not raised; raises ``OSError`` if the drop folder itself
    cannot be opened.
    """
    path = inbox / SIGNATURE_NAME
    try:
        signature = read_inbox_file(inbox, SIGNATURE_NAME, MAX_SIGNATURE_BYTES)
    except Rejection as exc:
        return Delivery(signature_id(path, None), None, None, exc)
    sig_id = signature_id(path, signature)
    if decided is not None and sig_id == decided:
        return Delivery(sig_id, signature, None, None)
    limit = limits.max_manifest_bytes
    try:
        fd = open_in_inbox(inbox, MANIFEST_NAME)
    except Rejection as exc:
        return Delivery(sig_id, signature, None, exc)
    with os.fdopen(fd, "rb") as fh:
        identity = file_identity(os.fstat(fd), time.time())
        if identity is not None and judged == (sig_id, identity):
            return Delivery(sig_id, signature, None, None, identity, unchanged=True)
        manifest = fh.read(limit + 1)
    if len(manifest) > limit:
        problem = Rejection(LIMIT_EXCEEDED, f"{MANIFEST_NAME} is larger than {limit} bytes")
        return Delivery(sig_id, signature, None, problem, identity)
    return Delivery(sig_id, signature, manifest, None, identity)


def signature_id(path: Path, data: bytes | None) -> str | None:
    """Identity of one upload of the signature file, None if there is no such file.

    Its SHA-256 with its inode and modification time, so that the same bytes
    uploaded again (ed25519 signatures are deterministic) are looked at again;
    the inode alone if the file is unreadable.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    upload = f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}"
    if data is None:
        return f"unreadable:{upload}:{st.st_size}"
    return f"{hashlib.sha256(data).hexdigest()}:{upload}"


def sequence_hint(manifest_bytes: bytes | None) -> int | None:
    """Best-effort sequence of a rejected manifest, for the record only.

    The bytes are not trusted: a manifest of at most ``HINT_BYTES`` is parsed,
    a larger one is only searched, in its first ``HINT_BYTES``, for a
    ``"sequence": N`` member; nothing beyond that head is looked at.
    """
    if not manifest_bytes:
        return None
    if len(manifest_bytes) > HINT_BYTES:
        found = _SEQUENCE_RE.search(manifest_bytes, 0, HINT_BYTES)
        return int(found.group(1)) if found else None
    try:
        value = json.loads(manifest_bytes).get("sequence")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


DELIVERY_EVENTS = frozenset(("created", "modified", "attrib", "moved", "deleted", "closed"))
"""watchdog event types that can change a delivery: a file made, written (``closed`` is a
close after writing), renamed, removed, or its mode or times changed (``attrib`` from
watchdog 7, ``modified`` before). watchdog 2.3 added opens (``opened``) and 5.0 read-only
closes (``closed_no_write``): those are the agent's own reads of the drop folder, and waking
on them made every step wake the next one."""

WATCH_CHECK_INTERVAL = 1.0
"""Seconds between checks, while waiting, that the inotify watch still covers the drop
folder: a folder replaced (renamed, deleted and made again) or mounted over leaves the watch
on the old folder, or ends it, without a word."""


class _Wake(FileSystemEventHandler):  # type: ignore[misc]
    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in DELIVERY_EVENTS:
            return
        paths = (event.src_path, getattr(event, "dest_path", ""))
        if any(str(p).endswith(SIGNATURE_NAME) for p in paths):
            # The signature is uploaded last (§1.2): act at once, no quiet period.
            self._watcher.signature.set()
        self._watcher.wake.set()


class Watcher:
    """Sets ``wake`` on drop-folder events; falls back to polling on failure.

    ``mode`` is ``inotify`` while a watch covers the drop folder, else ``polling``;
    ``failure`` says why it does not. A watch lost to the folder being replaced,
    deleted or remounted is noticed within ``check_interval`` seconds of waiting and
    re-armed on the folder now at that path; ``on_change(event, detail)`` is told
    (``watcher-lost``, ``watcher-rearmed``).
    """

    def __init__(
        self,
        inbox: Path,
        check_interval: float = WATCH_CHECK_INTERVAL,
        on_change: Callable[[str, str], None] | None = None,
    ) -> None:
        self.inbox = inbox
        self.wake = threading.Event()
        self.signature = threading.Event()
        self.mode = "polling"
        self.failure: str | None = None
        self.check_interval = check_interval
        self._on_change = on_change
        self._observer: Any | None = None
        self._watched: tuple[int, int] | None = None
        self._rearm = False

    def start(self) -> None:
        """Start the inotify observer, or record why polling is used instead.

        When inotify itself refuses (no instances or watches left) polling stays;
        when the folder is missing, ``check`` arms the watch once it exists.
        """
        try:
            self._arm()
        except OSError as exc:
            self._rearm = isinstance(exc, (FileNotFoundError, NotADirectoryError))
            self.failure = f"inotify unavailable ({exc.strerror or exc}); polling the drop folder"
            log.warning("%s", self.failure)

    def _arm(self) -> None:
        """Watch the folder now at ``inbox`` (its identity read first, so that a folder
        replaced meanwhile shows at the next check). Raises ``OSError``."""
        st = os.stat(self.inbox)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.inbox))
        observer = Observer()
        observer.schedule(_Wake(self), str(self.inbox), recursive=True)
        observer.start()
        self._observer = observer
        self._watched = (st.st_dev, st.st_ino)
        self.mode = "inotify"
        self.failure = None

    def _lost(self) -> str | None:
        """Why the watch no longer covers the drop folder, None if it does."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return "the inotify observer stopped"
        emitters = list(observer.emitters)
        if not emitters or not all(emitter.is_alive() for emitter in emitters):
            return "the inotify watch ended"
        try:
            st = os.stat(self.inbox)
        except OSError as exc:
            return f"the drop folder is gone ({exc.strerror})"
        if (st.st_dev, st.st_ino) != self._watched:
            return "the drop folder was replaced or mounted over"
        return None

    def check(self) -> bool:
        """Re-arm the watch if it no longer covers the drop folder.

        True if a watch was armed just now: the agent should look at the folder at
        once, since what arrived meanwhile made no event. While the folder is
        missing, polling stays and the next check tries again; if inotify itself
        refuses (no watches left), polling stays for good.
        """
        if self._observer is not None:
            reason = self._lost()
            if reason is None:
                return False
            self.stop()
            self.mode = "polling"
            self.failure = f"inotify watch lost ({reason}); polling the drop folder"
            self._rearm = True
            log.warning("%s", self.failure)
            self._tell("watcher-lost", self.failure)
        if not self._rearm:
            return False
        try:
            self._arm()
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            self._rearm = False
            self.failure = f"inotify unavailable ({exc.strerror or exc}); polling the drop folder"
            log.warning("%s", self.failure)
            self._tell("watcher-lost", self.failure)
            return False
        self._rearm = False
        log.info("inotify watch re-armed on %s", self.inbox)
        self._tell("watcher-rearmed", str(self.inbox))
        return True

    def _tell(self, event: str, detail: str) -> None:
        if self._on_change is not None:
            self._on_change(event, detail)

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

        While waiting, checks every ``check_interval`` seconds that the watch still
        covers the drop folder (``check``); a watch re-armed counts as an event.
        After an event, waits until ``quiet`` seconds pass with no further event (at
        most one rescan interval), so bursts coalesce; an event on the signature
        file returns at once.
        """
        woke = self._wait_event(timeout)
        deadline = time.monotonic() + timeout
        while woke and time.monotonic() < deadline and not self.signature.is_set():
            self.wake.clear()
            if not self.wake.wait(quiet):
                break
        self.wake.clear()
        self.signature.clear()
        return woke

    def _wait_event(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an event, checking the watch meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.wake.wait(min(left, self.check_interval)) or self.check():
                return True


@dataclass
class Pending:
    """A signature seen in the drop folder whose cut is not yet decided.

    ``judged`` is the (signature, manifest) identity of its last attempt when
    that attempt failed before the signature verified, and ``verdict`` that
    failure: while neither file changes the manifest is not read again.
    ``decided`` is the decision of its last attempt whose signature verified and
    what was published then: while the manifest bytes and both stay the same, the
    cut (still waiting for its files) is not verified and parsed again.
    """

    signature_sha256: str
    first_seen: float
    last_reason: str = ""
    judged: tuple[str, FileIdentity] | None = None
    verdict: Rejection | None = None
    decided: tuple[Published, Decision] | None = None

    def settled(self, now: float, settle_timeout: float) -> bool:
        """True once the cut has had ``settle_timeout`` seconds to arrive."""
        return now - self.first_seen >= settle_timeout
