"""The verified bytes of each cut, kept where nothing else writes them.

``sftp`` reads the files it sends by path, and the PREP system may rewrite
its output folder at any time: a file changed after the local check, or
between two targets, would leave the institute with bytes it never verified.
So the check copies every listed file it has not kept yet into a private
store while it hashes the copied bytes, and keeps there the very manifest and
signature bytes it verified; every target is sent from the store. Files are
named by their SHA-256 (``[distribute] state``/``cuts``/HEX, a private
folder), so a cut that changes 5 % of its files writes 5 %: the others are
already kept.
:meth:`Snapshots.prune` removes what no cut still in use lists.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from prep_agent.core.errors import Error

CHUNK = 1024 * 1024
"""Bytes read and written at a time while copying."""
PARTIAL = ".part-"
"""Prefix of a file being written (removed by :meth:`Snapshots.prune`)."""
STALE_PARTIAL = 3600.0
"""Seconds after which another process's partial file counts as abandoned."""
LOCK_NAME = ".lock"
"""The lock file every process sending from the store holds shared."""
FILE_MODE = 0o644
"""Mode of a kept file. sftp gives an uploaded file its local mode, and the
difusor's upload account must be able to overwrite it with the next cut's
bytes: so not read-only (the store's folder is private, 0700)."""
VIEWS = ".views"
"""The store's folder of views: a cut's files under their own paths (hard links)."""


def copy_hashing(source: Path, target: Path) -> tuple[int, str]:
    """Copy ``source`` to a new file ``target``; return the size and SHA-256
    of the bytes written (what was read, whatever the source holds later).

    Raises OSError (``FileNotFoundError`` when the source is missing).
    """
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with open(fd, "wb") as dst:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
    return size, digest.hexdigest()


class Snapshots:
    """The store of verified bytes, one file per SHA-256.

    Every process that sends from it holds a shared lock on ``root/.lock``
    while it runs (:meth:`open`); :meth:`prune` removes files only under the
    exclusive lock, so a one-shot run never removes what a ``--watch`` run on
    the same state folder is still sending, nor the reverse.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock: int | None = None
        self._views: dict[str, set[str]] = {}
        self._views_lock = threading.Lock()

    def open(self) -> None:
        """Take this process's shared lock on the store. Raises ``Error``."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.lockf(self._lock, fcntl.LOCK_SH)
        except OSError as exc:
            raise Error(f"cannot use cut snapshots under {self.root}: {exc.strerror}") from None

    def close(self) -> None:
        """Release the lock (closing the file releases it)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def path(self, sha256: str) -> Path:
        """Where the bytes with this SHA-256 are kept."""
        return self.root / sha256

    def holds(self, sha256: str) -> bool:
        """Whether the bytes with this SHA-256 are kept (verified when written)."""
        return os.path.isfile(os.path.join(self.root, sha256))

    def partial(self) -> Path:
        """A new name to write into, in the store (created on first use). Raises ``Error``."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise Error(f"cannot write cut snapshots under {self.root}: {exc.strerror}") from None
        return self.root / f"{PARTIAL}{os.getpid()}-{os.urandom(6).hex()}"

    def keep(self, partial: Path, sha256: str) -> None:
        """File the verified ``partial`` under its SHA-256. Raises ``Error``."""
        try:
            os.replace(partial, self.path(sha256))
        except OSError as exc:
            discard(partial)
            raise Error(f"cannot keep a verified file in {self.root}: {exc.strerror}") from None

    def keep_bytes(self, data: bytes) -> str:
        """Keep ``data`` (a verified manifest or signature); its SHA-256. Raises ``Error``."""
        sha = hashlib.sha256(data).hexdigest()
        if self.holds(sha):
            return sha
        partial = self.partial()
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with open(fd, "wb") as fh:
                fh.write(data)
        except OSError as exc:
            discard(partial)
            raise Error(f"cannot write cut snapshots under {self.root}: {exc.strerror}") from None
        self.keep(partial, sha)
        return sha

    def view(self, name: str, files: Mapping[str, str]) -> Path:
        """The folder of view ``name`` where each path of ``files`` is a hard link
        to the kept bytes of its SHA-256, so sftp can send a file by its own
        name (links already made for the view are not made again).

        Raises ``Error``.
        """
        root = self.root / VIEWS / name
        with self._views_lock:
            linked = self._views.setdefault(name, set())
            folders: set[Path] = set()
            for rel, sha in files.items():
                if rel in linked:
                    continue
                target = root / rel
                try:
                    if target.parent not in folders:
                        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                        folders.add(target.parent)
                    _link(self.path(sha), target)
                except OSError as exc:
                    raise Error(f"cannot link kept files into {root}: {exc.strerror}") from None
                linked.add(rel)
        return root

    def prune(self, keep: Iterable[str], views: Iterable[str] = ()) -> None:
        """Remove every kept file whose SHA-256 is not in ``keep``, every view not
        named in ``views``, and the partial files a run left (this process's,
        or any older than an hour); nothing while another process uses the
        store (or before :meth:`open`)."""
        if self._lock is None:
            return
        try:
            fcntl.lockf(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return  # another run sends from the store: the next prune will do
        try:
            self._remove(set(keep))
            self._remove_views(set(views))
        finally:
            fcntl.lockf(self._lock, fcntl.LOCK_SH)

    def _remove_views(self, wanted: set[str]) -> None:
        try:
            names = os.listdir(self.root / VIEWS)
        except OSError:
            return
        for name in names:
            if name not in wanted:
                with self._views_lock:
                    self._views.pop(name, None)
                    shutil.rmtree(self.root / VIEWS / name, ignore_errors=True)

    def _remove(self, wanted: set[str]) -> None:
        mine = f"{PARTIAL}{os.getpid()}-"
        try:
            names = os.listdir(self.root)
        except OSError:
            return
        for name in names:
            path = self.root / name
            if name.startswith(PARTIAL):
                with contextlib.suppress(OSError):
                    if name.startswith(mine) or time.time() - path.stat().st_mtime > STALE_PARTIAL:
                        path.unlink()
            elif name not in wanted and not name.startswith("."):
                discard(path)


def _link(source: Path, target: Path) -> None:
    """Make ``target`` a hard link to ``source``, replacing a file of that name
    atomically (a view left by an earlier run). Raises OSError."""
    try:
        os.link(source, target)
    except FileExistsError:
        partial = target.with_name(f"{PARTIAL}{os.getpid()}-{os.urandom(6).hex()}")
        os.link(source, partial)
        os.replace(partial, target)


def discard(path: Path) -> None:
    """Remove one file of the store (errors ignored)."""
    with contextlib.suppress(OSError):
        path.unlink()
