"""The verified bytes of each cut, kept where nothing else writes them.

``sftp`` reads the files it sends by path, and the PREP system may rewrite
its output folder at any time: a file changed after the local check, or
between two targets, would leave the institute with bytes it never verified.
So the check copies every listed file into a private snapshot while it hashes
the copied bytes, and writes there the very manifest and signature bytes it
verified; every target is sent from the snapshot. A file whose bytes the
previous snapshot already holds (same path, same SHA-256) is a hard link to it
rather than a copy. Snapshots are read-only; :meth:`Snapshots.prune` removes
those no target still needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from prep_agent.core.errors import Error
from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME

CHUNK = 1024 * 1024
"""Bytes read and written at a time while copying."""
STAGING = ".staging-"
"""Prefix of a snapshot being written (removed by :meth:`Snapshots.prune`)."""
STALE_STAGING = 3600.0
"""Seconds after which another process's staging folder counts as abandoned."""


def copy_hashing(source: Path, target: Path) -> tuple[int, str]:
    """Copy ``source`` to a new read-only ``target``; return the size and SHA-256
    of the bytes written (what was read, whatever the source holds later).

    Raises OSError (``FileNotFoundError`` when the source is missing).
    """
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as src:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        with open(fd, "wb") as dst:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
                dst.write(chunk)
    return size, digest.hexdigest()


def _listed(manifest: bytes) -> dict[str, str]:
    """Path → SHA-256 of a snapshot's own (verified) manifest; empty if unreadable."""
    try:
        doc = json.loads(manifest)
        return {str(f["path"]): str(f["sha256"]) for f in doc["files"]}
    except (ValueError, KeyError, TypeError):
        return {}


class Snapshots:
    """The folder of verified cut snapshots (``[distribute] state``/``cuts``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sequence: int, manifest_sha256: str) -> Path:
        """Where the snapshot of one cut lives."""
        return self.root / f"{sequence:016d}-{manifest_sha256[:16]}"

    def _ready(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [self.root / n for n in names if not n.startswith(".")]

    def previous(self) -> tuple[Path | None, dict[str, str]]:
        """The newest finished snapshot and its files (path → SHA-256), for reuse."""
        ready = self._ready()
        if not ready:
            return None, {}
        try:
            return ready[-1], _listed((ready[-1] / MANIFEST_NAME).read_bytes())
        except OSError:
            return None, {}

    def staging(self, sequence: int) -> Path:
        """A new empty private folder to write a snapshot into. Raises ``Error``."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            folder = self.root / f"{STAGING}{sequence}-{os.getpid()}-{os.urandom(4).hex()}"
            folder.mkdir(mode=0o700)
        except OSError as exc:
            raise Error(f"cannot write cut snapshots under {self.root}: {exc.strerror}") from None
        return folder

    def finish(self, staging: Path, manifest: bytes, signature: bytes, final: Path) -> Path:
        """Write the verified manifest and signature, then move ``staging`` to
        ``final`` (kept as it is if another run finished it first). Raises ``Error``.
        """
        try:
            for name, data in ((MANIFEST_NAME, manifest), (SIGNATURE_NAME, signature)):
                fd = os.open(staging / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
                with open(fd, "wb") as fh:
                    fh.write(data)
            try:
                os.rename(staging, final)
            except OSError:
                if not (final / SIGNATURE_NAME).is_file():
                    raise
                discard(staging)
        except OSError as exc:
            discard(staging)
            raise Error(f"cannot write the cut snapshot {final}: {exc.strerror}") from None
        return final

    def prune(self, keep: Iterable[Path]) -> None:
        """Remove every snapshot but the newest and those in ``keep``, and the
        staging folders a run left (this process's, or any older than an hour)."""
        wanted = {Path(p) for p in keep}
        ready = self._ready()
        wanted.update(ready[-1:])
        for folder in ready:
            if folder not in wanted:
                discard(folder)
        mine = f"-{os.getpid()}-"
        with contextlib.suppress(OSError):
            for name in os.listdir(self.root):
                path = self.root / name
                stale = time.time() - path.stat().st_mtime > STALE_STAGING
                if name.startswith(STAGING) and (mine in name or stale):
                    discard(path)


def discard(folder: Path) -> None:
    """Remove a snapshot folder, read-only files and all (errors ignored)."""
    shutil.rmtree(folder, ignore_errors=True)
