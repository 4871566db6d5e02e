"""The audit of a difusor's public copy: does it serve the institute's bytes?

From outside, with nothing but the institute's public keys: read the public
``status.json``, fetch the release's signed manifest and signature
(prep-cut-v1 §5), verify them with the same pure core the agent uses, and
only then, trusting the manifest, fetch the listed files and compare each
size and SHA-256; the frame must show the same cut time, the caching headers
must be the documented ones, and the cut must be the newest the auditor knows.
Every difference is one ``Finding`` (path, expected, got).
"""

from __future__ import annotations

import html
import json
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from prep_agent.core.allowed_signers import AllowedSigner
from prep_agent.core.errors import Rejection
from prep_agent.core.manifest import WELL_KNOWN, FileEntry, Limits, Manifest, parse_manifest
from prep_agent.core.protocol import CACHE_FRAME, CACHE_RELEASE, RELEASES_FOLDER
from prep_agent.core.verify import MAX_SIGNATURE_BYTES, Policy, check_signatures
from prep_agent.institute.audit.fetch import TIMEOUT, Fetched, Fetcher, FetchError

INTACT = "intact"
"""Verdict: every checked file, the frame and the headers are the institute's."""
ALTERED = "altered"
"""Verdict: something served differs from what the institute signed or documented."""
STALE = "stale"
"""Verdict: an authentic, intact copy of a cut older than the newest known."""
UNREACHABLE = "unreachable"
"""Verdict: nothing differs, but some answer did not come (timeout, connection, 5xx)."""

MAX_STATUS_BYTES = 64 * 1024
"""``status.json`` is a few hundred bytes."""
MAX_FRAME_BYTES = 1024**2
"""The frame page is a few kilobytes."""
FRAME_SETTLE = 1.5
"""Seconds before the frame is read again when it shows another cut than status.json:
the embedded server and nginx each re-read the two files up to a second apart."""
STATUS_FORMAT = "prep-status/1"
_RELEASE_RE = re.compile(r"[0-9A-Za-z_-][0-9A-Za-z._-]{0,254}")
_CUT_TIME_RE = re.compile(r'<time id="cut-time" datetime="([^"]*)"')


@dataclass(frozen=True)
class Finding:
    """One difference: what ``path`` should have been and what it was."""

    kind: str
    path: str
    expected: str
    got: str

    def line(self) -> str:
        """The one-line report: ``path: expected X, got Y``."""
        return f"{self.path}: expected {self.expected}, got {self.got}"


@dataclass(frozen=True)
class AuditOptions:
    """What to trust and how much to fetch.

    ``sample``: None fetches every listed file, else N random files plus the
    entry page and every CSV and zip (the stamped files).
    """

    signers: tuple[AllowedSigner, ...]
    threshold: int = 1
    election: str | None = None
    sample: int | None = None
    expect_sequence: int | None = None
    timeout: float = 10.0
    concurrency: int = 8
    limits: Limits = field(default_factory=Limits)


@dataclass
class AuditReport:
    """The result of one audit."""

    url: str
    sequence: int | None = None
    cut_time: str | None = None
    release: str | None = None
    listed: int = 0
    checked: int = 0
    checked_bytes: int = 0
    seconds: float = 0.0
    findings: list[Finding] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """INTACT, ALTERED, STALE or UNREACHABLE (the worst finding decides)."""
        kinds = {f.kind for f in self.findings}
        for verdict in (ALTERED, UNREACHABLE, STALE):
            if verdict in kinds:
                return verdict
        return INTACT

    def add(self, kind: str, path: str, expected: str, got: str) -> None:
        """Record one finding."""
        self.findings.append(Finding(kind, path, expected, got))

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON document."""
        return {
            "url": self.url,
            "verdict": self.verdict,
            "sequence": self.sequence,
            "cut_time": self.cut_time,
            "release": self.release,
            "listed": self.listed,
            "checked": self.checked,
            "checked_bytes": self.checked_bytes,
            "seconds": round(self.seconds, 3),
            "findings": [f.__dict__ for f in self.findings],
        }


def _status_kind(status: int) -> str:
    """A 404 (or any 4xx) is a copy that lacks the file; 5xx and the rest: no answer."""
    return ALTERED if 400 <= status < 500 and status != 429 else UNREACHABLE


class _Audit:
    """One audit run: the fetcher, the options and the report being filled."""

    def __init__(self, fetcher: Fetcher, options: AuditOptions, report: AuditReport) -> None:
        self.fetcher = fetcher
        self.options = options
        self.report = report
        self.headers_seen: dict[tuple[str, str], list[str]] = {}

    def get(
        self, path: str, max_bytes: int, expected_cache: str, keep: bool, size: str = "200 OK"
    ) -> Fetched | None:
        """GET ``path``; a failure or a non-200 answer is a finding (then None).

        ``size`` is what a failed read was expected to get (a file's size).
        """
        try:
            fetched = self.fetcher.get(path, max_bytes, keep)
        except FetchError as exc:
            self.report.add(ALTERED if exc.altered else UNREACHABLE, path, size, str(exc))
            return None
        if fetched.status != 200:
            self.report.add(_status_kind(fetched.status), path, "200 OK", f"HTTP {fetched.status}")
            return None
        got = fetched.headers.get("cache-control", "(none)")
        if got != expected_cache:
            self.headers_seen.setdefault((expected_cache, got), []).append(path)
        return fetched

    def status(self) -> dict[str, Any] | None:
        """The public status.json, if it is a prep-status/1 document naming a release."""
        fetched = self.get("status.json", MAX_STATUS_BYTES, CACHE_FRAME, keep=True)
        if fetched is None:
            return None
        try:
            doc = json.loads(fetched.body)
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's depth
            doc = None
        if not isinstance(doc, dict) or doc.get("format") != STATUS_FORMAT:
            got = f"{fetched.headers.get('content-type', 'no type')}, {fetched.size} bytes"
            self.report.add(ALTERED, "status.json", f"a {STATUS_FORMAT} document", got)
            return None
        release = doc.get("release")
        if not isinstance(release, str) or not _RELEASE_RE.fullmatch(release):
            self.report.add(ALTERED, "status.json", "a published release", repr(release)[:80])
            return None
        self.report.release = release
        return doc

    def manifest(self, release: str, now: datetime) -> tuple[Manifest, str] | None:
        """§3 first: the release's manifest, only once its signature verifies."""
        folder = f"{RELEASES_FOLDER}/{release}"
        signed = f"{folder}/{WELL_KNOWN}"
        limit = self.options.limits.max_manifest_bytes
        data = self.get(f"{signed}/manifest.json", limit, CACHE_RELEASE, keep=True)
        sig = self.get(f"{signed}/manifest.json.sig", MAX_SIGNATURE_BYTES, CACHE_RELEASE, True)
        if data is None or sig is None:
            return None
        policy = Policy(
            election=self.options.election or "",
            signers=self.options.signers,
            threshold=self.options.threshold,
            limits=self.options.limits,
        )
        try:
            check_signatures(data.body, sig.body, policy, now)
        except Rejection as exc:
            self.report.add(
                ALTERED, f"{signed}/manifest.json.sig", "the institute's signature", str(exc)
            )
            return None
        try:
            return parse_manifest(data.body, self.options.limits), folder
        except Rejection as exc:
            self.report.add(ALTERED, f"{signed}/manifest.json", "a prep-cut/1 manifest", str(exc))
            return None

    def compare_status(self, status: dict[str, Any], manifest: Manifest, release: str) -> None:
        """The unsigned status.json must name the signed cut it points to."""
        pairs = (
            ("sequence", manifest.sequence),
            ("cut_time", manifest.cut_time_text),
            ("entry", f"{RELEASES_FOLDER}/{release}/{self.quoted(manifest.entry)}"),
        )
        for key, expected in pairs:
            if status.get(key) != expected:
                self.report.add(ALTERED, f"status.json {key}", str(expected), str(status.get(key)))
        if self.options.election is not None and manifest.election != self.options.election:
            self.report.add(ALTERED, "manifest election", self.options.election, manifest.election)
        expect = self.options.expect_sequence
        if expect is not None and manifest.sequence < expect:
            got = f"sequence {manifest.sequence} ({manifest.cut_time_text})"
            self.report.add(STALE, "status.json", f"sequence {expect} or newer", got)

    def quoted(self, path: str) -> str:
        """``path`` as the frame links it (percent-encoded, ``/`` kept)."""
        return self.fetcher.target(path)[len(self.fetcher.base_path) :]

    def frame(self, manifest: Manifest, now: datetime) -> None:
        """The frame (/) shows the same cut time as the signed manifest, or that of a
        newer signed cut the difusor published during the audit."""
        for attempt in range(2):
            fetched = self.get("", MAX_FRAME_BYTES, CACHE_FRAME, keep=True)
            if fetched is None:
                return
            found = _CUT_TIME_RE.search(fetched.body.decode("utf-8", "replace"))
            shown = html.unescape(found.group(1)) if found else "no cut time"
            if shown == manifest.cut_time_text:
                return
            if attempt == 0:  # servers re-read the frame apart from status.json
                time.sleep(FRAME_SETTLE)
        if not self.published_meanwhile(manifest, shown, now):
            self.report.add(ALTERED, "/ (frame)", f"cut time {manifest.cut_time_text}", shown)

    def published_meanwhile(self, manifest: Manifest, shown: str, now: datetime) -> bool:
        """Whether status.json now names a newer cut, signed by the institute, whose
        cut time the frame shows: a publication during the audit, not an alteration.
        The audited release stays the one first read (its files are checked)."""
        audited = self.report.release
        status = self.status()
        self.report.release = audited
        if status is None or status["release"] == audited:
            return False
        signed = self.manifest(status["release"], now)
        if signed is None:
            return False
        newer = signed[0]
        return newer.sequence > manifest.sequence and newer.cut_time_text == shown

    def file(self, folder: str, entry: FileEntry) -> None:
        """One listed file: at most its signed size plus one byte, then size and SHA-256."""
        path = f"{folder}/{entry.path}"
        fetched = self.get(path, entry.size, CACHE_RELEASE, False, f"{entry.size} bytes")
        if fetched is None:
            return
        self.report.checked += 1
        self.report.checked_bytes += fetched.size
        if fetched.size != entry.size:
            self.report.add(ALTERED, path, f"{entry.size} bytes", f"{fetched.size} bytes")
        elif fetched.sha256 != entry.sha256:
            self.report.add(ALTERED, path, f"sha256 {entry.sha256}", f"sha256 {fetched.sha256}")

    def files(self, folder: str, entries: list[FileEntry]) -> None:
        """Every chosen file, ``concurrency`` at a time."""
        workers = max(1, min(self.options.concurrency, len(entries)))
        with ThreadPoolExecutor(workers, thread_name_prefix="audit") as pool:
            for done in pool.map(lambda e: self.file(folder, e), entries):
                del done

    def header_findings(self) -> None:
        """One finding per wrong Cache-Control value, naming its first path."""
        for (expected, got), paths in self.headers_seen.items():
            more = f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""
            self.report.add(ALTERED, paths[0] + more, f"Cache-Control {expected}", got)


def choose_files(manifest: Manifest, sample: int | None, rng: random.Random) -> list[FileEntry]:
    """Every listed file, or ``sample`` random ones plus the entry page and every
    CSV and zip (the files that carry the cut's stamp, prep-cut-v1 §4.7)."""
    if sample is None:
        return list(manifest.files)
    must = [
        f
        for f in manifest.files
        if f.path == manifest.entry or f.path.lower().endswith((".csv", ".zip"))
    ]
    rest = [f for f in manifest.files if f not in must]
    return must + rng.sample(rest, min(sample, len(rest)))


def audit(url: str, options: AuditOptions, now: datetime) -> AuditReport:
    """Audit the difusor at ``url`` as of ``now`` (the auditor's clock).

    Nothing in the manifest is used before its signature verifies. Raises
    ``ConfigError`` for a URL that is not http(s); every other failure is a
    finding in the report.
    """
    started = time.monotonic()
    report = AuditReport(url)
    fetcher = Fetcher(url, options.timeout)
    try:
        run = _Audit(fetcher, options, report)
        status = run.status()
        signed = run.manifest(status["release"], now) if status is not None else None
        if status is not None and signed is not None:
            manifest, folder = signed
            report.sequence, report.cut_time = manifest.sequence, manifest.cut_time_text
            report.listed = len(manifest.files)
            run.compare_status(status, manifest, status["release"])
            run.frame(manifest, now)
            run.files(folder, choose_files(manifest, options.sample, random.SystemRandom()))
        run.header_findings()
    finally:
        fetcher.close()
        report.seconds = time.monotonic() - started
    return report


__all__ = ["TIMEOUT", "AuditOptions", "AuditReport", "Finding", "audit", "choose_files"]
