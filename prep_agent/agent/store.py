"""Publication (prep-cut-v1 §4.5–§4.7, §5): releases, the ``current`` swap, quarantine.

The folders live where ``layout.Layout`` says.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable

from prep_agent.agent.intake import open_in_inbox, precheck_inbox
from prep_agent.agent.layout import Layout
from prep_agent.core import stamps
from prep_agent.core.errors import FILE_MISMATCH, STAMP_MISMATCH, ZIP_INVALID, Error, Rejection
from prep_agent.core.manifest import WELL_KNOWN, FileEntry, Limits, Manifest, parse_manifest
from prep_agent.shared.clock import Clock, utc_now
from prep_agent.shared.fsutil import fsync_dir

CHUNK = 1024 * 1024
"""Copy buffer: memory per copied file stays at this, whatever its size."""
CACHED_RELEASES = 2
"""Parsed releases kept in memory at most: ``current`` and the one being built (only
``current`` once it is swapped in). A parsed manifest of 200,000 files takes ~63 MiB
(benchmarks/RESULTS.md); the reuse index keeps one entry per distinct file instead."""

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


@dataclass(frozen=True)
class Release:
    """A release on disk and the manifest it was published from."""

    name: str
    path: Path
    manifest: Manifest
    manifest_sha256: str


def release_name(manifest: Manifest, manifest_sha256: str) -> str:
    """Folder name of a release: sortable by sequence, unique per manifest."""
    return f"{manifest.sequence:016d}-{manifest_sha256[:16]}"


def sync_filesystem(path: Path) -> None:
    """Flush every dirty page of the file system holding ``path`` (``syncfs``).

    One call instead of an fsync per file: the release becomes durable before
    it is renamed into place.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a (possibly read-only) tree owned by the agent."""
    if not path.exists() and not path.is_symlink():
        return
    for dirpath, _dirs, _files in os.walk(path):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(path)


def copy_verified(src_fd: int, dst: Path | None, entry: FileEntry) -> None:
    """Copy ``src_fd`` to a new read-only ``dst``, hashing the bytes written.

    With ``dst`` None the bytes are only hashed (``prep-agent verify``). Reads
    at most ``entry.size + 1`` bytes. Raises ``Rejection(FILE_MISMATCH)``
    (transient) on another size or hash.
    """
    digest = hashlib.sha256()
    written = 0
    out = -1
    if dst is not None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out = os.open(dst, flags, 0o444)
    try:
        with os.fdopen(src_fd, "rb", buffering=0) as src:
            while written <= entry.size:
                chunk = src.read(min(CHUNK, entry.size + 1 - written))
                if not chunk:
                    break
                view = memoryview(chunk)
                while out >= 0 and view:
                    view = view[os.write(out, view) :]
                digest.update(chunk)
                written += len(chunk)
    finally:
        if out >= 0:
            os.close(out)
    if written != entry.size:
        more = "more than " if written > entry.size else ""
        raise Rejection(
            FILE_MISMATCH,
            f"{entry.path!r}: {more}{written} bytes, listed {entry.size}",
            transient=True,
        )
    if digest.hexdigest() != entry.sha256:
        raise Rejection(FILE_MISMATCH, f"{entry.path!r}: SHA-256 differs", transient=True)


def _is_stamped(entry: FileEntry) -> bool:
    return entry.path.lower().endswith((".csv", ".zip"))


def _check_one_stamp(
    fh: BinaryIO, entry: FileEntry, manifest: Manifest, mode: str, warn: Callable[[str], None]
) -> None:
    try:
        stamps.check_file(entry.path, fh, manifest.cut_time)
    except Rejection as exc:
        if exc.reason not in (STAMP_MISMATCH, ZIP_INVALID) or mode == "reject":
            raise
        warn(str(exc))


def check_stamps(
    release_dir: Path, manifest: Manifest, mode: str, warn: Callable[[str], None]
) -> None:
    """§4.7 on the staged (verified) copies, reused files included.

    Raises ``Rejection`` (STAMP_MISMATCH or ZIP_INVALID) in ``reject`` mode.
    """
    if mode == "off":
        return
    for entry in filter(_is_stamped, manifest.files):
        with open(release_dir / entry.path, "rb") as fh:
            _check_one_stamp(fh, entry, manifest, mode, warn)


def _index_files(
    index: dict[tuple[str, int], tuple[str, str]],
    name: str,
    files: Iterator[tuple[str, int, str]],
    newest: bool,
) -> None:
    """Add a release's files to a reuse index. The ``newest`` release wins over every
    one indexed before, and the index then keeps its strings (shared with its parsed
    manifest); an older one only fills in what newer releases do not hold."""
    for sha256, size, path in files:
        key = (sha256, size)
        if newest:
            index.pop(key, None)
        elif key in index:
            continue
        index[key] = (name, path)


class Store:
    """The agent-owned storage of one root: releases, ``current``, quarantine."""

    def __init__(self, layout: Layout, limits: Limits, clock: Clock = utc_now) -> None:
        self.layout = layout
        self.limits = limits
        self.clock = clock
        self.root = layout.root
        self.releases = layout.releases
        self.staging = layout.staging
        self.quarantine_dir = layout.quarantine
        self.current_link = layout.current
        self._cache: OrderedDict[str, Release] = OrderedDict()
        self._cache_lock = threading.Lock()  # health reads current() from web threads
        self._index: dict[tuple[str, int], tuple[str, str]] | None = None

    def ensure_layout(self) -> None:
        """Create the folders and drop leftovers of an interrupted build."""
        self.layout.create()
        for leftover in self.staging.iterdir():
            remove_tree(leftover)
        for trash in self.releases.glob(".trash-*"):
            remove_tree(trash)
        for tmp in self.layout.current_temps():
            tmp.unlink()

    def current_name(self) -> str | None:
        """Name of the release ``current`` points to, or None."""
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        return Path(target).name

    def release_names(self) -> list[str]:
        """Names of the complete releases, oldest first (none before ``init``)."""
        if not self.releases.is_dir():
            return []
        return sorted(p.name for p in self.releases.iterdir() if not p.name.startswith("."))

    def load_release(self, name: str) -> Release:
        """Read a release's manifest from its ``.well-known`` copy (the last
        ``CACHED_RELEASES`` read or built are kept).

        Raises ``Error`` if the release is damaged.
        """
        with self._cache_lock:
            cached = self._cache.get(name)
            if cached is not None:
                self._cache.move_to_end(name)
                return cached
        path = self.releases / name
        try:
            data = self._manifest_bytes(name)
            manifest = parse_manifest(data, self.limits)
        except Rejection as exc:
            raise Error(f"release {name} is damaged: {exc}") from None
        release = Release(name, path, manifest, hashlib.sha256(data).hexdigest())
        self._remember(release)
        return release

    def _remember(self, release: Release) -> None:
        with self._cache_lock:
            self._cache[release.name] = release
            self._cache.move_to_end(release.name)
            while len(self._cache) > CACHED_RELEASES:
                self._cache.popitem(last=False)

    def _forget_all_but(self, name: str) -> None:
        with self._cache_lock:
            for other in [n for n in self._cache if n != name]:
                del self._cache[other]

    def _manifest_bytes(self, name: str) -> bytes:
        try:
            return (self.releases / name / WELL_KNOWN / "manifest.json").read_bytes()
        except OSError as exc:
            raise Error(f"release {name} is damaged: {exc}") from None

    def _release_files(self, name: str) -> Iterator[tuple[str, int, str]]:
        """(SHA-256, size, path) of every file of a retained release, from the parsed
        release if cached, else from its manifest's JSON (the agent's own verified
        copy: not validated again, and not kept). Raises ``Error`` if damaged."""
        with self._cache_lock:
            cached = self._cache.get(name)
        if cached is not None:
            return ((f.sha256, f.size, f.path) for f in cached.manifest.files)
        try:
            doc: Any = json.loads(self._manifest_bytes(name))
            files = [(str(f["sha256"]), int(f["size"]), str(f["path"])) for f in doc["files"]]
        except (ValueError, TypeError, KeyError) as exc:
            raise Error(f"release {name} is damaged: {exc!r}") from None
        return iter(files)

    def current(self) -> Release | None:
        """The published release, or None before the first cut."""
        name = self.current_name()
        return None if name is None else self.load_release(name)

    def reuse_index(self) -> dict[tuple[str, int], tuple[str, str]]:
        """Verified files of the retained releases: (SHA-256, size) -> (release, path).

        Built once, then kept up to date by ``build`` and ``prune``; the newest
        release holding a file wins, so pruning the oldest only drops the
        entries nothing newer holds. One entry per distinct file, not per
        release: the retained releases' manifests are not kept parsed.
        """
        if self._index is None:
            index: dict[tuple[str, int], tuple[str, str]] = {}
            for name in reversed(self.release_names()):
                _index_files(index, name, self._release_files(name), newest=False)
            self._index = index  # kept only once complete
        return self._index

    def _add_to_index(self, release: Release) -> None:
        if self._index is not None:
            files = self._release_files(release.name)
            _index_files(self._index, release.name, files, newest=True)

    def _source(
        self, index: dict[tuple[str, int], tuple[str, str]], entry: FileEntry
    ) -> str | None:
        hit = index.get((entry.sha256, entry.size))
        return None if hit is None else f"{self.releases}/{hit[0]}/{hit[1]}"

    def build(
        self,
        manifest: Manifest,
        manifest_bytes: bytes,
        sig_bytes: bytes,
        inbox: Path,
        stamp_mode: str,
        warn: Callable[[str], None],
        digest: str | None = None,
    ) -> tuple[Release, int]:
        """Build a verified release; return it and the number of bytes copied.

        Files already held by a retained release are hard-linked from it (never
        from the drop folder); others are copied from the inbox while hashed.
        ``digest`` is the manifest's SHA-256 if the caller has it. Raises
        ``Rejection``; nothing is left in ``releases/`` on failure.
        """
        digest = digest or hashlib.sha256(manifest_bytes).hexdigest()
        name = release_name(manifest, digest)
        final = self.releases / name
        if final.exists():
            return self.load_release(name), 0
        index = self.reuse_index()
        fresh = [f for f in manifest.files if (f.sha256, f.size) not in index]
        precheck_inbox(inbox, fresh)
        work = self.staging / name
        remove_tree(work)
        work.mkdir()
        try:
            copied = self._fill(work, manifest, index, inbox)
            check_stamps(work, manifest, stamp_mode, warn)
            self._seal(work, manifest_bytes, sig_bytes)
            os.rename(work, final)
        except BaseException:
            remove_tree(work)
            raise
        os.chmod(final, 0o555)
        fsync_dir(self.releases)
        release = Release(name, final, manifest, digest)
        self._remember(release)
        self._add_to_index(release)
        return release, copied

    def _fill(
        self,
        work: Path,
        manifest: Manifest,
        index: dict[tuple[str, int], tuple[str, str]],
        inbox: Path,
    ) -> int:
        copied = 0
        made: set[str] = set()
        base = str(work)
        for entry in manifest.files:
            dst = f"{base}/{entry.path}"
            parent = os.path.dirname(dst)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            source = self._source(index, entry)
            if source is not None:
                os.link(source, dst)
                continue
            copy_verified(open_in_inbox(inbox, entry.path), Path(dst), entry)
            copied += entry.size
        return copied

    def check(
        self, manifest: Manifest, inbox: Path, stamp_mode: str, warn: Callable[[str], None]
    ) -> None:
        """Every §4.5 and §4.7 check of ``build``, without writing anything.

        Raises ``Rejection``.
        """
        index = self.reuse_index()
        fresh = [f for f in manifest.files if (f.sha256, f.size) not in index]
        precheck_inbox(inbox, fresh)
        for entry in fresh:
            copy_verified(open_in_inbox(inbox, entry.path), None, entry)
        if stamp_mode == "off":
            return
        for entry in filter(_is_stamped, manifest.files):
            source = self._source(index, entry)
            fd = os.open(source, os.O_RDONLY) if source else open_in_inbox(inbox, entry.path)
            with os.fdopen(fd, "rb") as fh:
                _check_one_stamp(fh, entry, manifest, stamp_mode, warn)

    def _seal(self, work: Path, manifest_bytes: bytes, sig_bytes: bytes) -> None:
        well_known = work / WELL_KNOWN
        well_known.mkdir(parents=True, exist_ok=True)
        for fname, data in (("manifest.json", manifest_bytes), ("manifest.json.sig", sig_bytes)):
            target = well_known / fname
            target.write_bytes(data)
            target.chmod(0o444)
        # The release folder itself becomes read-only after its rename (``build``):
        # moving a folder to another parent rewrites its ".." entry, which needs
        # write permission on it without CAP_DAC_OVERRIDE (the packaged service).
        for dirpath, _dirs, _files in os.walk(work, topdown=False):
            if dirpath != str(work):
                os.chmod(dirpath, 0o555)
        sync_filesystem(work)

    def swap(self, name: str) -> None:
        """Make ``releases/name`` current: one ``os.replace`` of a symlink + dir fsync."""
        if not (self.releases / name).is_dir():
            raise Error(f"no release {name}")
        tmp = self.layout.current_temp(os.getpid())
        tmp.unlink(missing_ok=True)
        os.symlink(self.layout.current_target(name), tmp)
        os.replace(tmp, self.current_link)
        fsync_dir(self.root)
        self._forget_all_but(name)

    def prune(self, keep: int, replaced_seconds: float = 0.0) -> list[str]:
        """Delete releases beyond the newest ``keep``, never the current one.

        A release is also kept while the next newer one is younger than
        ``replaced_seconds`` (by its folder's mtime, written when it was built,
        just before its swap): a status.json naming it may still be in a browser,
        a CDN or nginx's descriptor cache, and its page may still be loading.
        """
        names = self.release_names()
        current = self.current_name()
        recent = time.time() - replaced_seconds
        doomed = []
        for i, name in enumerate(names[: max(0, len(names) - keep)]):
            if name == current:
                continue
            if replaced_seconds > 0 and (self.releases / names[i + 1]).lstat().st_mtime > recent:
                continue
            doomed.append(name)
        for name in doomed:
            # Rename first: a crash mid-delete must never leave a partial release
            # under its own name (release_names skips dot names).
            trash = self.releases / f".trash-{name}"
            os.rename(self.releases / name, trash)
            with self._cache_lock:
                self._cache.pop(name, None)
            remove_tree(trash)
        if doomed and self._index is not None:
            gone = set(doomed)
            self._index = {k: v for k, v in self._index.items() if v[0] not in gone}
        return doomed

    def quarantine(
        self,
        rejection: Rejection,
        manifest_bytes: bytes | None,
        sig_bytes: bytes | None,
        sequence: int | None,
        keep: int,
        keep_bytes: int,
        files: Mapping[str, bytes] | None = None,
    ) -> Path:
        """Keep a rejected cut's manifest, signature and reason (and ``files``: plain
        names and their bytes, e.g. a rejected package zip).

        The folder is named after the store's clock and ``sequence``. The oldest
        entries are dropped while more than ``keep`` or more than ``keep_bytes``
        in all are kept; the new entry always stays. Raises ``OSError``.
        """
        stamp = self.clock().astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        folder = self.quarantine_dir / f"{stamp}-{sequence if sequence is not None else 'unknown'}"
        folder.mkdir(parents=True)
        reason = {"reason": rejection.reason, "detail": rejection.detail, "sequence": sequence}
        (folder / "reason.json").write_text(json.dumps(reason, ensure_ascii=False, indent=2))
        if manifest_bytes is not None:
            (folder / "prep-manifest.json").write_bytes(manifest_bytes)
        if sig_bytes is not None:
            (folder / "prep-manifest.json.sig").write_bytes(sig_bytes)
        for fname, data in (files or {}).items():
            (folder / fname).write_bytes(data)
        older = sorted(p for p in self.quarantine_dir.iterdir() if p != folder)
        sizes = [_tree_bytes(p) for p in older]
        count, total = len(older) + 1, sum(sizes) + _tree_bytes(folder)
        for old, size in zip(older, sizes):
            if count <= keep and total <= keep_bytes:
                break
            remove_tree(old)
            count, total = count - 1, total - size
        return folder


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (a quarantine entry)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total
