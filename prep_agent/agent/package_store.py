"""Publication of PREP packages (``[source] type = https-package``), issue 15.

A package fetched over HTTPS (``agent/fetch.py``) is checked by the pure core
(``core.package.inspect_package``), placed after the last accepted one
(``core.package.check_order``: newer, replay, rollback, equivocation) and
published as an immutable release with the same guarantees as a drop-folder
cut: built in ``staging/``, flushed, renamed into ``releases/``, then ``current``
swapped with ``Store.swap``; rejected packages are quarantined with their reason.

A package release holds::

    paquete/<file name>.zip                   the zip as downloaded, byte-identical
    archivos/<path>                           every entry unpacked, byte-identical
    resultados/index.html, resultados/...     the results pages rendered from the CSVs
    .well-known/prep-package/package.json     name, SHA-256, stamp, source host, signers
    .well-known/prep-package/<file name>.sig  the institute's signature as published, if signed
    .well-known/prep-cut/manifest.json        the release's file list, written by the agent

The last is in the prep-cut/1 format (no ``.sig``: the agent signs nothing), so
every reader of a release (status, health, the frame, rollback, the rollback
floor, nginx) reads a package release as it reads a drop-folder one: sequence
``YYYYMMDDHHMM``, cut_time the stamp with its offset, the period from ``[source]
cut_period_seconds``, the results index as its entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable, Protocol

from prep_agent.agent.config import Config
from prep_agent.agent.journal import Journal, write_published
from prep_agent.agent.lock import LockFile
from prep_agent.agent.package_pages import PAGES_FOLDER, render_results_pages
from prep_agent.agent.state import Rejected, State, save_state
from prep_agent.agent.store import Release, Store, release_name, remove_tree, sync_filesystem
from prep_agent.core.errors import (
    EQUIVOCATION,
    PACKAGE_UNSIGNED,
    PATH_INVALID,
    SIGNATURE_MALFORMED,
    SIGNATURE_UNTRUSTED,
    Error,
    Rejection,
)
from prep_agent.core.manifest import FORMAT, WELL_KNOWN, parse_manifest
from prep_agent.core.package import Package, check_order, inspect_package, package_stamp
from prep_agent.shared.clock import Clock
from prep_agent.shared.fsutil import fsync_dir

if TYPE_CHECKING:  # the https source's modules load requests: only its agents import them
    from prep_agent.agent.fetch import Fetcher
    from prep_agent.agent.https_get import FetchError

log = logging.getLogger(__name__)

ZIP_FOLDER = "paquete"
"""Folder of a package release holding the zip as downloaded."""
FILES_FOLDER = "archivos"
"""Folder of a package release holding the package's entries, unpacked."""
PACKAGE_INFO = ".well-known/prep-package/package.json"
"""The package's metadata in its release."""
PACKAGE_FOLDER = ".well-known/prep-package"
"""Folder of a package release holding its metadata and the institute's signature."""
MAX_JOURNALED_WARNINGS = 20
"""Warnings of one package written to the journal (all of them go to package.json)."""
PACKAGE_REFUSALS = (SIGNATURE_MALFORMED, SIGNATURE_UNTRUSTED, PACKAGE_UNSIGNED)
"""Poll failures that are the package's own (its signature), recorded as rejections;
every other poll failure is a ``source-error``."""
_PLAIN_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]{1,255}")


class Metrics(Protocol):
    """The counters a publication feeds (``web.health.Metrics``)."""

    def observe_publish(self, seconds: float) -> None:
        """Record one publication's duration."""

    def count_rejection(self, reason: str) -> None:
        """Count one rejection."""


@dataclass(frozen=True)
class PackageInfo:
    """Where a published package came from (``.well-known/prep-package/package.json``)."""

    name: str
    sha256: str
    stamp: str
    """The cut stamp, RFC 3339 with the CSVs' offset."""
    sequence: int
    host: str
    """The institute's host the package was downloaded from."""
    url: str
    signed_by: tuple[str, ...] | None
    """Fingerprints of the trusted keys whose signature verified, or None: unsigned."""
    warnings: tuple[str, ...] = ()
    signature: str | None = None
    """Path in the release of the institute's ``.sig`` as published (None: unsigned)."""

    @property
    def signed(self) -> bool:
        """Whether a trusted signature over the zip's bytes verified."""
        return self.signed_by is not None

    def document(self) -> dict[str, Any]:
        """The JSON object written to the release."""
        return {
            "format": "prep-package/1",
            "name": self.name,
            "sha256": self.sha256,
            "stamp": self.stamp,
            "sequence": self.sequence,
            "host": self.host,
            "url": self.url,
            "signed": self.signed,
            "signed_by": list(self.signed_by) if self.signed_by is not None else None,
            "warnings": list(self.warnings),
            "signature": self.signature,
        }


def read_package_info(release: Release) -> PackageInfo | None:
    """The package a release was built from, or None for a drop-folder release.

    Raises ``Error`` if the release's package.json is there but damaged.
    """
    path = release.path / PACKAGE_INFO
    try:
        doc: Any = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise Error(f"release {release.name}: {PACKAGE_INFO} is unreadable: {exc}") from None
    try:
        signed_by = doc["signed_by"]
        return PackageInfo(
            name=str(doc["name"]),
            sha256=str(doc["sha256"]),
            stamp=str(doc["stamp"]),
            sequence=int(doc["sequence"]),
            host=str(doc["host"]),
            url=str(doc["url"]),
            signed_by=None if signed_by is None else tuple(str(k) for k in signed_by),
            warnings=tuple(str(w) for w in doc.get("warnings", ())),
            signature=None if doc.get("signature") is None else str(doc["signature"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise Error(f"release {release.name}: {PACKAGE_INFO} is damaged: {exc!r}") from None


def source_text(info: PackageInfo) -> str:
    """What the frame says about the cut's origin, in Spanish."""
    signed = "firmado por el instituto" if info.signed else "sin firma"
    return f"Origen: paquete del instituto descargado de {info.host} ({signed})"


def signature_path(name: str) -> str:
    """Where a release keeps the ``.sig`` of the package ``name``."""
    return f"{PACKAGE_FOLDER}/{name}.sig"


def release_files(
    package: Package, info: PackageInfo, data: bytes, signature: bytes | None = None
) -> dict[str, bytes]:
    """Every file of the package's release but the manifest: the zip ``data``, its
    entries unpacked, the results pages, package.json and the institute's
    ``signature`` (at ``info.signature``) if given. Raises nothing."""
    files = {f"{ZIP_FOLDER}/{package.name}": data}
    if signature is not None and info.signature is not None:
        files[info.signature] = signature
    files.update({f"{FILES_FOLDER}/{path}": data for path, data in package.entries.items()})
    files.update(render_results_pages(package, FILES_FOLDER))
    doc = json.dumps(info.document(), ensure_ascii=False, indent=1).encode("utf-8") + b"\n"
    files[PACKAGE_INFO] = doc
    return files


def release_manifest(config: Config, package: Package, files: Mapping[str, bytes]) -> bytes:
    """The release's file list in the prep-cut/1 format (deterministic: the same
    package gives the same bytes, so a rebuild after a crash finds its release)."""
    stamp = package.stamp.isoformat()
    doc = {
        "format": FORMAT,
        "election": config.election,
        "sequence": package.sequence,
        "cut_time": stamp,
        "signed_at": stamp,
        "period_seconds": config.source.cut_period_seconds,
        "final": False,
        "entry": f"{PAGES_FOLDER}/index.html",
        "files": [
            {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for path, data in sorted(files.items())
        ],
    }
    return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"


def _write_new(path: str, data: bytes) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, 0o444)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def build_release(store: Store, files: Mapping[str, bytes], manifest_bytes: bytes) -> Release:
    """Write a release holding ``files`` and its manifest, as ``Store.build`` does:
    in ``staging/``, read-only, flushed, then renamed into ``releases/``.

    A release of the same manifest already there is returned as is. Raises
    ``Rejection`` if the manifest breaks a prep-cut/1 rule (a path not in NFC, a
    segment over 255 bytes), ``OSError``; nothing is left in ``releases/`` on failure.
    """
    manifest = parse_manifest(manifest_bytes, store.limits)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    name = release_name(manifest, digest)
    final = store.releases / name
    if final.exists():
        return store.load_release(name)
    work = store.staging / name
    remove_tree(work)
    work.mkdir()
    try:
        made: set[str] = set()
        for path, data in [*files.items(), (f"{WELL_KNOWN}/manifest.json", manifest_bytes)]:
            target = f"{work}/{path}"
            parent = os.path.dirname(target)
            if parent not in made:
                os.makedirs(parent, exist_ok=True)
                made.add(parent)
            _write_new(target, data)
        for dirpath, _dirs, _files in os.walk(work, topdown=False):
            if dirpath != str(work):
                os.chmod(dirpath, 0o555)
        sync_filesystem(work)
        os.rename(work, final)
    except BaseException:
        remove_tree(work)
        raise
    os.chmod(final, 0o555)
    fsync_dir(store.releases)
    return store.load_release(name)


@dataclass(frozen=True)
class PackageOutcome:
    """What one poll did: ``idle`` (nothing new, or bytes decided before),
    ``published``, ``replay``, ``rejected`` or ``source-error``."""

    status: str
    sequence: int | None = None
    rejection: Rejection | None = None


class PackageIntake:
    """Polls the package source, decides and publishes the packages of one root."""

    def __init__(
        self,
        config: Config,
        store: Store,
        journal: Journal,
        metrics: Metrics,
        clock: Clock,
        show: Callable[[Release], None],
        fetcher: Fetcher,
    ) -> None:
        self.config = config
        self.store = store
        self.journal = journal
        self.metrics = metrics
        self.clock = clock
        self.show = show
        self.fetcher = fetcher
        self.notify: Callable[[], None] = lambda: None
        """Called after a publication or a rejection (the health push)."""
        self._source_error: str | None = None
        self.source_error: str | None = None
        """Why the last poll failed to get an answer from the source, in one line
        (``reason: detail``, health's ``source:fetch``); None once one succeeds."""

    def poll(self, load_state: Callable[[], State]) -> tuple[PackageOutcome, State | None]:
        """Poll the source once (without the publication lock: a download may take up
        to ``deadline_seconds``), then, holding it, decide and publish a new package
        against ``load_state()``. Returns the outcome and the new state (None if
        unchanged). A package whose publication failed is downloaded again next poll.

        Raises ``OSError`` or ``Error`` (a failure of the agent's own).
        """
        from prep_agent.agent.https_get import FetchError  # loaded with the fetcher

        polled = time.monotonic()
        try:
            fetched = self.fetcher.poll(self.clock())
        except FetchError as exc:
            refused = exc.reason in PACKAGE_REFUSALS
            self.source_error = None if refused else f"{exc.reason}: {exc.detail}"
            return self._source_failed(exc, load_state)
        self.source_error = None
        if self._source_error is not None:
            self.journal.write("source-recovered", reason=self._source_error)
            self._source_error = None
        if fetched is None:
            return PackageOutcome("idle"), None
        try:
            with LockFile(self.config.layout.publish_lock_file, blocking=True):
                done, state = self.publish(
                    load_state(),
                    fetched.file_name,
                    fetched.data,
                    fetched.signed_by,
                    fetched.host,
                    fetched.url,
                    polled,
                    fetched.signature,
                )
        except BaseException:
            self.fetcher.forget()
            raise
        if done.status in ("published", "rejected"):
            self.notify()
        return done, state

    def _source_failed(
        self, exc: FetchError, load_state: Callable[[], State]
    ) -> tuple[PackageOutcome, State | None]:
        """Journal a failed poll once per reason in a row; a bad or missing required
        signature is the package's rejection (state, health, metrics), anything else a
        ``source-error``."""
        rejection = Rejection(exc.reason, exc.detail)
        refused = exc.reason in PACKAGE_REFUSALS
        status = "rejected" if refused else "source-error"
        if exc.reason == self._source_error:
            return PackageOutcome(status, rejection=rejection), None
        self._source_error = exc.reason
        state = None
        if refused:
            with LockFile(self.config.layout.publish_lock_file, blocking=True):
                now = self.clock().isoformat(timespec="seconds")
                rejected = Rejected(now, exc.reason, exc.detail)
                state = replace(load_state(), last_rejection=rejected)
                save_state(self.config.layout.state_file, state)
            self.metrics.count_rejection(exc.reason)
            self.notify()
        event = "cut-rejected" if refused else "source-error"
        self.journal.write(event, reason=exc.reason, detail=exc.detail, source="https-package")
        return PackageOutcome(status, rejection=rejection), state

    def last_accepted(self, state: State) -> tuple[datetime, str] | None:
        """The last package accepted: the state's, or the one ``current`` was built
        from if it is later (a crash between the swap and the state write).

        Raises ``Error`` on a damaged release.
        """
        last = None
        if state.package_stamp and state.package_sha256:
            last = (datetime.fromisoformat(state.package_stamp), state.package_sha256)
        current = self.store.current()
        info = read_package_info(current) if current is not None else None
        if info is not None:
            published = (datetime.fromisoformat(info.stamp), info.sha256)
            if last is None or published[0] > last[0]:
                last = published
        return last

    def publish(
        self,
        state: State,
        name: str,
        data: bytes,
        signed_by: tuple[str, ...] | None,
        host: str,
        url: str = "",
        polled: float | None = None,
        signature: bytes | None = None,
    ) -> tuple[PackageOutcome, State]:
        """Decide the package ``data`` published as ``name`` on ``host`` and publish it
        if it is the newest; return the outcome and the new state (already saved).

        ``signed_by`` names the trusted keys whose signature over ``data`` verified
        (None: unsigned), ``signature`` is that ``.sig`` as published, kept in the
        release; ``polled`` is when its poll began (``time.monotonic()``).
        Raises ``OSError`` or ``Error`` (a failure of the agent's own: nothing was
        decided, the published cut stays).
        """
        started = time.monotonic()
        polled = started if polled is None else polled
        sha256 = hashlib.sha256(data).hexdigest()
        if sha256 == state.package_decided_sha256:
            return PackageOutcome("idle"), state
        named = package_stamp(name) if _PLAIN_NAME.fullmatch(name) else None
        sequence = int(named) if named else None  # until the CSVs give the stamp
        try:
            if not _PLAIN_NAME.fullmatch(name) or name in (".", ".."):
                raise Rejection(PATH_INVALID, f"package name {name[:100]!r} is not a file name")
            package = inspect_package(name, data)
            sequence = package.sequence
            if not check_order(self.last_accepted(state), package):
                self.journal.write("cut-replay", sequence=sequence, package_sha256=sha256)
                state = replace(state, package_decided_sha256=sha256)
                save_state(self.config.layout.state_file, state)
                return PackageOutcome("replay", sequence), state
            kept_sig = signature_path(name) if signature is not None else None
            info = PackageInfo(
                name, sha256, package.stamp.isoformat(), sequence, host, url, signed_by,
                package.warnings, kept_sig,
            )  # fmt: skip
            files = release_files(package, info, data, signature)
            manifest_bytes = release_manifest(self.config, package, files)
            checked = time.monotonic()
            release = build_release(self.store, files, manifest_bytes)
        except Rejection as rejection:
            return self._refuse(
                state, rejection, name, data, sha256, sequence, host, signed_by, signature
            )
        built = time.monotonic()
        self.store.swap(release.name)
        swapped = time.monotonic()
        self.show(release)
        state = replace(
            state,
            highest_sequence=max(state.highest_sequence, release.manifest.sequence),
            highest_manifest_sha256=release.manifest_sha256,
            package_stamp=info.stamp,
            package_sha256=sha256,
            package_decided_sha256=sha256,
        )
        save_state(self.config.layout.state_file, state)
        self.metrics.observe_publish(swapped - started)
        m = release.manifest
        steps = {
            "check_ms": (checked - started) * 1000,
            "build_ms": (built - checked) * 1000,
            "swap_ms": (swapped - built) * 1000,
            "total_ms": (swapped - started) * 1000,
            "since_seen_ms": (swapped - polled) * 1000,
        }
        write_published(
            self.journal,
            release,
            signed_by or (),
            m.total_bytes,
            steps,
            source="https-package",
            source_host=host,
            package=name,
            package_sha256=sha256,
            signed=signed_by is not None,
        )
        if package.warnings:
            shown = list(package.warnings[:MAX_JOURNALED_WARNINGS])
            self.journal.write(
                "package-warnings", sequence=m.sequence, count=len(package.warnings), first=shown
            )
        pruned = self.store.prune(self.config.keep_releases, self.config.keep_replaced_seconds)
        if pruned:
            self.journal.write("releases-pruned", releases=pruned)
        return PackageOutcome("published", m.sequence), state

    def _refuse(
        self,
        state: State,
        rejection: Rejection,
        name: str,
        data: bytes,
        sha256: str,
        sequence: int | None,
        host: str,
        signed_by: tuple[str, ...] | None,
        signature: bytes | None = None,
    ) -> tuple[PackageOutcome, State]:
        """Quarantine a rejected package (its zip, its signature if signed, and the
        reason), record and journal it."""
        if rejection.reason == EQUIVOCATION:
            log.error("ALARM: the institute published two packages for one cut: %s", rejection)
        kept_name = name if _PLAIN_NAME.fullmatch(name) and not name.startswith(".") else "paquete"
        about = {"name": name, "sha256": sha256, "host": host, "signed_by": signed_by}
        files = {
            kept_name: data,
            "package.json": json.dumps(about, ensure_ascii=False, indent=1).encode() + b"\n",
        }
        if signature is not None:
            files[f"{kept_name}.sig"] = signature
        folder = self.store.quarantine(
            rejection,
            None,
            None,
            sequence,
            self.config.keep_quarantine,
            self.config.keep_quarantine_bytes,
            files=files,
        )
        now = self.clock().isoformat(timespec="seconds")
        state = replace(
            state,
            last_rejection=Rejected(now, rejection.reason, rejection.detail, sequence),
            package_decided_sha256=sha256,
        )
        save_state(self.config.layout.state_file, state)
        self.metrics.count_rejection(rejection.reason)
        self.journal.write(
            "cut-rejected",
            reason=rejection.reason,
            detail=rejection.detail,
            sequence=sequence,
            quarantine=str(folder),
            source="https-package",
            source_host=host,
            package=name,
            package_sha256=sha256,
        )
        return PackageOutcome("rejected", sequence, rejection), state
