"""Health (health-v1 §1–§2): the health+json document, /livez, /readyz, /metrics.

``Snapshot`` is what the agent knows at one instant, with the host's readings
(``SystemReadings``, taken by ``web.system``) only when the full view is asked
for; ``health_document`` turns it into the document (pure: no clock, no host
reads), ``Metrics`` keeps the counters, and ``create_app`` serves them with Flask.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from flask import Flask

from prep_agent import __version__
from prep_agent.agent.state import Rejected
from prep_agent.core.freshness import STALE, freshness
from prep_agent.core.manifest import Manifest
from prep_agent.core.protocol import HEALTH_TYPE

PUBLISH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Histogram buckets (seconds) of prep_publish_duration_seconds."""
DISK_WARN_PERCENT = 85.0
"""``disk:utilization`` warns from this percent of the releases' file system in use
(health-v1 §1)."""
DISK_FAIL_PERCENT = 97.0
"""``disk:utilization`` fails from this percent (health-v1 §1): the next cut may not fit."""
MEMORY_WARN_PERCENT = 90.0
"""``memory:utilization`` warns from this percent of memory in use (less than 10 %
available): the kernel then evicts the page cache that serves the releases, and the
OOM killer is near. Never ``fail``: the agent can still publish."""
CPU_WARN_PERCENT = 90.0
"""``cpu:utilization`` warns from this percent of all CPUs busy, averaged since the
previous reading (``web.system.CPU_WINDOW`` seconds at least): publication and
serving slow down. Never ``fail``: the agent can still publish."""
REJECTION_WARN_PERIODS = 1
"""``cut:last-rejection`` warns for this many cut periods after a rejection (until the
institute's next cut is due), and for as long as the rejected cut is newer than the
published one. The institute not sending good cuts is ``warn``, never ``fail``."""
DEFAULT_PERIOD = 600
"""Cut period (seconds) before any cut is published (prep-cut-v1 §2 default)."""
PUBLICATION_FAIL_STEPS = 3
"""``agent:publication`` fails (and ``/readyz`` says not ready) once this many steps in
a row failed with an error of the agent's own (state file unreadable, I/O error, disk
full, drop folder gone): the next cut cannot be published. At the default
``rescan_interval`` of 5 s that is within about 10 s; fewer failures in a row warn.
One step that completes (a cut published, refused or none waiting) passes again."""

SEQUENCE_HEADER = "X-Prep-Sequence"
"""Header of ``/readyz`` answers: the published cut's sequence (0 before the first)."""

Checks = dict[str, list[dict[str, Any]]]


@dataclass(frozen=True)
class SystemReadings:
    """The host at one instant, for the full view only (taken by ``web.system``)."""

    disk_percent: float
    """Percent in use of the file system holding the releases."""
    memory_percent: float
    """Percent of memory in use (psutil: total minus available)."""
    cpu_percent: float | None
    """Percent of all CPUs busy since the previous reading; None before a first window."""


@dataclass(frozen=True)
class Snapshot:
    """What the agent knows at one instant.

    ``system`` holds the host's readings when the full view was asked for, and is
    None for the public view: then the host is not read at all.
    """

    now: datetime
    service_id: str
    manifest: Manifest | None
    manifest_sha256: str | None
    stale_periods: int
    last_rejection: Rejected | None
    watcher_mode: str
    watcher_fallback: bool
    agent_alive: bool
    storage_writable: bool
    last_report_age: float | None = None
    push_configured: bool = False
    system: SystemReadings | None = None
    failed_steps: int = 0
    """Steps in a row that failed with an error of the agent's own (0: the last one ran)."""
    last_error: str | None = None
    """That error, in one line (None when ``failed_steps`` is 0)."""
    source_polled: bool = False
    """Whether cuts come from polling a URL (``[source] type = https-package``)."""
    source_error: str | None = None
    """Why the last poll of that URL failed, in one line (None: it answered)."""
    scanned: bool = True
    """Whether the running agent has looked at its drop folder (or polled its
    source) since it started: until then it may serve an older cut than one it
    already holds (a restarted origin), so ``/readyz`` says not ready."""


def _check(
    status: str, now: str, value: Any = None, unit: str | None = None
) -> list[dict[str, Any]]:
    item: dict[str, Any] = {"status": status, "time": now, "observedValue": value}
    if unit:
        item["observedUnit"] = unit
    return [item]


def rejection_status(s: Snapshot) -> str:
    """``warn`` while the latest rejection matters (``REJECTION_WARN_PERIODS``), else ``pass``."""
    rejected = s.last_rejection
    if rejected is None:
        return "pass"
    m = s.manifest
    if rejected.sequence is not None and rejected.sequence > (m.sequence if m else 0):
        return "warn"  # readers see an older cut than the one the institute sent
    try:
        when = datetime.fromisoformat(rejected.time)
        age = (s.now - when).total_seconds()
    except (ValueError, TypeError):
        return "warn"  # a time we cannot read (or without offset) may be recent
    period = m.period_seconds if m else DEFAULT_PERIOD
    return "warn" if age < REJECTION_WARN_PERIODS * period else "pass"


def publication_status(s: Snapshot) -> str:
    """``fail`` after ``PUBLICATION_FAIL_STEPS`` failed steps in a row, ``warn`` after
    fewer, ``pass`` once a step ran."""
    if s.failed_steps >= PUBLICATION_FAIL_STEPS:
        return "fail"
    return "warn" if s.failed_steps else "pass"


def cut_checks(s: Snapshot) -> Checks:
    """The ``cut:*`` checks: public even without credentials."""
    now = s.now.isoformat(timespec="seconds")
    m = s.manifest
    fresh = freshness(m, s.now, s.stale_periods)
    age = round((s.now - m.cut_time).total_seconds(), 3) if m else None
    rejection = (
        f"{s.last_rejection.reason}: {s.last_rejection.detail}" if s.last_rejection else None
    )
    return {
        "cut:sequence": _check("pass" if m else "warn", now, m.sequence if m else None),
        "cut:time": _check("pass" if m else "warn", now, m.cut_time_text if m else None),
        "cut:age": _check("warn" if fresh == STALE or not m else "pass", now, age, "s"),
        "cut:manifest": _check("pass" if m else "warn", now, s.manifest_sha256),
        "cut:last-rejection": _check(rejection_status(s), now, rejection),
    }


def system_checks(system: SystemReadings, now: str) -> Checks:
    """Disk, memory and CPU checks of one reading of the host (full view only)."""
    disk = system.disk_percent
    disk_status = (
        "fail" if disk >= DISK_FAIL_PERCENT else "warn" if disk >= DISK_WARN_PERCENT else "pass"
    )
    memory_status = "warn" if system.memory_percent >= MEMORY_WARN_PERCENT else "pass"
    cpu = system.cpu_percent
    cpu_status = "warn" if cpu is not None and cpu >= CPU_WARN_PERCENT else "pass"
    return {
        "disk:utilization": _check(disk_status, now, disk, "percent"),
        "memory:utilization": _check(memory_status, now, system.memory_percent, "percent"),
        "cpu:utilization": _check(cpu_status, now, cpu, "percent"),
    }


def all_checks(s: Snapshot) -> Checks:
    """Every check the snapshot allows: the cut, watcher and report delivery checks,
    and the system checks when ``s.system`` holds a reading of the host."""
    now = s.now.isoformat(timespec="seconds")
    watcher = "fail" if not s.agent_alive else "warn" if s.watcher_fallback else "pass"
    # Without push configured (health-v1 §3) there is nothing to deliver: not a warning.
    report_status = "warn" if s.push_configured and s.last_report_age is None else "pass"
    checks = {**cut_checks(s), "inbox:watcher": _check(watcher, now, s.watcher_mode)}
    checks["agent:publication"] = _check(publication_status(s), now, s.last_error)
    if s.source_polled:
        # The institute's server failing is the institute not sending: warn, never fail.
        checks["source:fetch"] = _check("warn" if s.source_error else "pass", now, s.source_error)
    if s.system is not None:
        checks.update(system_checks(s.system, now))
    checks["report:delivery"] = _check(report_status, now, s.last_report_age, "s")
    return checks


def _overall(checks: Checks, s: Snapshot) -> tuple[str, str | None]:
    if s.manifest is None and not s.agent_alive:
        return "fail", "agent is not running"
    if not s.agent_alive:
        return "fail", "publisher is not running"
    if not s.storage_writable:
        return "fail", "release storage is not writable"
    if publication_status(s) == "fail":
        return "fail", f"cannot publish ({s.failed_steps} steps failed): {s.last_error}"
    failing = [k for k, v in checks.items() if v[0]["status"] == "fail"]
    if failing:
        return "fail", ", ".join(failing)
    warning = [k for k, v in checks.items() if v[0]["status"] == "warn"]
    return ("warn", ", ".join(warning)) if warning else ("pass", None)


def health_document(s: Snapshot) -> dict[str, Any]:
    """The health+json document of ``s`` (pure; raises nothing).

    With ``s.system`` (privileged callers, pushes) the full document; without it the
    public view: ``status``, ``serviceId``, ``time`` and the ``cut:*`` checks, its
    status summing up what is known without reading the host.
    """
    checks = all_checks(s)
    status, output = _overall(checks, s)
    doc: dict[str, Any] = {
        "status": status,
        "serviceId": s.service_id,
        "time": s.now.isoformat(timespec="seconds"),
    }
    if s.system is None:
        doc["checks"] = {k: v for k, v in checks.items() if k.startswith("cut:")}
        return doc
    doc.update(
        version=__version__,
        releaseId=__version__,
        description="prep-agent: difusor oficial del PREP",
        checks=checks,
    )
    if output:
        doc["output"] = output
    return doc


@dataclass
class Metrics:
    """Counters since the process started (thread-safe).

    ``instance`` (the config's ``instance``, for ``prep-agent@NAME``) labels every
    sample ``prep_instance="NAME"``, so the agents of one host stay apart.
    """

    instance: str = ""
    publish_buckets: list[int] = field(default_factory=lambda: [0] * len(PUBLISH_BUCKETS))
    publish_count: int = 0
    publish_sum: float = 0.0
    rejected: dict[str, int] = field(default_factory=dict)
    purges: dict[tuple[str, str], int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe_publish(self, seconds: float) -> None:
        """Record one publication's duration (signature seen to swap)."""
        with self.lock:
            for i, bound in enumerate(PUBLISH_BUCKETS):
                if seconds <= bound:
                    self.publish_buckets[i] += 1
            self.publish_count += 1
            self.publish_sum += seconds

    def count_rejection(self, reason: str) -> None:
        """Record one rejected cut by reason class."""
        with self.lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def count_purge(self, node: str, ok: bool) -> None:
        """Record one soft purge sent to a cache node (``web.purge``), done or failed."""
        key = (node, "ok" if ok else "failed")
        with self.lock:
            self.purges[key] = self.purges.get(key, 0) + 1

    def _sample(self, name: str, value: object, labels: str = "") -> str:
        """``name{labels} value``, with this instance's label first when it has one."""
        own = f'prep_instance="{self.instance}"' if self.instance else ""
        every = ",".join(x for x in (own, labels) if x)
        return f"{name}{{{every}}} {value}" if every else f"{name} {value}"

    def render(self, s: Snapshot) -> str:
        """Prometheus text format 0.0.4."""
        m = s.manifest
        sample = self._sample
        lines = [
            "# HELP prep_cut_sequence Sequence of the published cut (0 before the first).",
            "# TYPE prep_cut_sequence gauge",
            sample("prep_cut_sequence", m.sequence if m else 0),
            "# HELP prep_cut_timestamp_seconds cut_time of the published cut (Unix time).",
            "# TYPE prep_cut_timestamp_seconds gauge",
            sample("prep_cut_timestamp_seconds", m.cut_time.timestamp() if m else 0),
            "# HELP prep_cut_age_seconds Seconds since the published cut_time.",
            "# TYPE prep_cut_age_seconds gauge",
            sample("prep_cut_age_seconds", (s.now - m.cut_time).total_seconds() if m else 0),
            "# HELP prep_publish_duration_seconds Agent time from decision to current swapped.",
            "# TYPE prep_publish_duration_seconds histogram",
        ]
        bucket = "prep_publish_duration_seconds_bucket"
        with self.lock:
            for bound, count in zip(PUBLISH_BUCKETS, self.publish_buckets):
                lines.append(sample(bucket, count, f'le="{bound}"'))
            lines.append(sample(bucket, self.publish_count, 'le="+Inf"'))
            lines.append(sample("prep_publish_duration_seconds_sum", self.publish_sum))
            lines.append(sample("prep_publish_duration_seconds_count", self.publish_count))
            lines.append("# HELP prep_cuts_rejected_total Rejected cuts by reason class.")
            lines.append("# TYPE prep_cuts_rejected_total counter")
            for reason, count in sorted(self.rejected.items()):
                lines.append(sample("prep_cuts_rejected_total", count, f'reason="{reason}"'))
            if self.purges:
                lines.append("# HELP prep_purge_total Soft purges sent to cache nodes, by result.")
                lines.append("# TYPE prep_purge_total counter")
            for (node, result), count in sorted(self.purges.items()):
                labels = f'node="{node}",result="{result}"'
                lines.append(sample("prep_purge_total", count, labels))
        return "\n".join(lines) + "\n"


def behind(s: Snapshot, lag: str) -> str | None:
    """Why this origin is behind (one line), or None: ``/readyz?lag=SECONDS``.

    An origin cannot know the newest sequence its peers hold without talking to
    them; what it knows is when the institute's next cut was due: ``cut_time`` +
    ``period_seconds``. ``lag`` seconds after that, with no newer cut, this
    origin has missed a cut its peers may hold, and a balancer that checks
    ``/readyz?lag=N`` takes it out of rotation for the pointers until a cut
    arrives (packaging/ha). A final cut is never behind. A malformed ``lag`` is
    read as 0.
    """
    m = s.manifest
    if m is None or m.final:
        return None
    try:
        allowed = max(0.0, float(lag))
    except ValueError:
        allowed = 0.0
    overdue = (s.now - m.cut_time).total_seconds() - m.period_seconds
    if overdue <= allowed:
        return None
    return f"cut {m.sequence} is {overdue:.0f} s past its period"


def create_app(
    snapshot: Callable[[bool], Snapshot],
    metrics: Metrics,
    token: str | None,
    allow: Sequence[str],
) -> Flask:
    """The Flask application of /health, /livez, /readyz and /metrics.

    ``snapshot(full)`` reads the host only when ``full`` (a privileged /health).
    """
    # Imported here: Flask is a third of a command's start-up, and only the
    # commands that serve need it (``run --once``, ``status`` and the rest do not).
    from flask import Flask, Response, request

    app = Flask("prep_agent.web.health")
    networks = [ipaddress.ip_network(n, strict=False) for n in allow]

    def privileged() -> bool:
        auth = request.headers.get("Authorization", "")
        if token and hmac.compare_digest(auth.encode(), f"Bearer {token}".encode()):
            return True
        try:
            client = ipaddress.ip_address(request.remote_addr or "")
        except ValueError:
            return False
        return any(client in net for net in networks)

    def no_store(body: str, status: int, mimetype: str) -> Response:
        response = Response(body, status=status, mimetype=mimetype)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.get("/health")
    def health() -> Response:
        doc = health_document(snapshot(privileged()))
        code = 503 if doc["status"] == "fail" else 200
        return no_store(json.dumps(doc, ensure_ascii=False), code, HEALTH_TYPE)

    @app.get("/livez")
    def livez() -> Response:
        return no_store("ok\n", 200, "text/plain")

    @app.get("/readyz")
    def readyz() -> Response:
        s = snapshot(False)
        ready = s.manifest is not None and s.agent_alive and publication_status(s) != "fail"
        ready = ready and s.scanned
        body, code = ("ok\n", 200) if ready else ("not ready\n", 503)
        lag = request.args.get("lag")
        if ready and lag is not None:
            late = behind(s, lag)
            if late:
                body, code = f"behind: {late}\n", 503
        response = no_store(body, code, "text/plain")
        response.headers[SEQUENCE_HEADER] = str(s.manifest.sequence if s.manifest else 0)
        return response

    @app.get("/metrics")
    def metrics_text() -> Response:
        if not privileged():
            return no_store("forbidden\n", 403, "text/plain")
        return no_store(metrics.render(snapshot(False)), 200, "text/plain; version=0.0.4")

    return app
