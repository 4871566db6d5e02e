"""Each health check can leave ``pass`` and come back (health-v1 §1), driven by
constructed snapshots: the document builder is pure, so no agent, clock or sleep.
The public view never asks for the host's readings."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from prep_agent.agent.state import Rejected
from prep_agent.core.manifest import Limits, Manifest, parse_manifest
from prep_agent.web.health import (
    CPU_WARN_PERCENT,
    DISK_FAIL_PERCENT,
    DISK_WARN_PERCENT,
    MEMORY_WARN_PERCENT,
    Metrics,
    Snapshot,
    SystemReadings,
    create_app,
    health_document,
)
from prep_agent.web.system import CPU_WINDOW, SystemProbe

pytestmark = pytest.mark.core


NOW = datetime(2021, 6, 7, 1, 40, tzinfo=timezone.utc)
PERIOD = 600
CALM = SystemReadings(disk_percent=40.0, memory_percent=30.0, cpu_percent=5.0)


def manifest(sequence: int) -> Manifest:
    doc = {
        "format": "prep-cut/1",
        "election": "e",
        "sequence": sequence,
        "cut_time": "2021-06-06T20:30:00-05:00",
        "signed_at": "2021-06-06T20:31:00-05:00",
        "period_seconds": PERIOD,
        "entry": "a",
        "files": [{"path": "a", "size": 0, "sha256": "0" * 64}],
    }
    return parse_manifest(json.dumps(doc).encode(), Limits())


def snapshot(**changes: Any) -> Snapshot:
    base: dict[str, Any] = {
        "now": NOW,
        "service_id": "d",
        "manifest": manifest(3),
        "manifest_sha256": "ab" * 32,
        "stale_periods": 3,
        "last_rejection": None,
        "watcher_mode": "inotify",
        "watcher_fallback": False,
        "agent_alive": True,
        "storage_writable": True,
        "system": CALM,
    }
    base.update(changes)
    return Snapshot(**base)


def rejected(seconds_ago: float, sequence: int | None) -> Rejected:
    when = (NOW - timedelta(seconds=seconds_ago)).isoformat(timespec="seconds")
    return Rejected(when, "signature-untrusted", "no trusted signature", sequence)


def status(s: Snapshot, key: str) -> str:
    doc = health_document(s)
    return str(doc["checks"][key][0]["status"])


def test_every_check_passes_on_a_calm_snapshot() -> None:
    doc = health_document(snapshot())
    assert doc["status"] == "pass" and "output" not in doc
    assert {c[0]["status"] for c in doc["checks"].values()} == {"pass"}


def test_rejection_of_a_newer_cut_warns_until_a_newer_cut_is_published() -> None:
    refused = snapshot(last_rejection=rejected(10 * PERIOD, sequence=4))
    assert status(refused, "cut:last-rejection") == "warn"
    doc = health_document(refused)
    assert doc["status"] == "warn" and doc["output"] == "cut:last-rejection"
    assert doc["checks"]["cut:last-rejection"][0]["observedValue"].startswith("signature-")
    caught_up = replace(refused, manifest=manifest(5))
    assert status(caught_up, "cut:last-rejection") == "pass"
    assert health_document(caught_up)["status"] == "pass"


def test_any_rejection_warns_for_one_period() -> None:
    for sequence in (3, 2, None):  # the published cut again, an older one, unreadable
        fresh = snapshot(last_rejection=rejected(PERIOD - 1, sequence))
        assert status(fresh, "cut:last-rejection") == "warn", sequence
        old = snapshot(last_rejection=rejected(PERIOD, sequence))
        assert status(old, "cut:last-rejection") == "pass", sequence
    assert status(snapshot(last_rejection=None), "cut:last-rejection") == "pass"


def test_rejection_before_any_cut_uses_the_default_period() -> None:
    def before_any_cut(seconds_ago: float) -> Snapshot:
        return snapshot(
            manifest=None, manifest_sha256=None, last_rejection=rejected(seconds_ago, None)
        )

    assert status(before_any_cut(599), "cut:last-rejection") == "warn"
    assert status(before_any_cut(600), "cut:last-rejection") == "pass"


def test_rejection_with_an_unreadable_time_warns() -> None:
    for text in ("yesterday", "2021-06-07T01:00:00"):  # garbage; no offset
        s = snapshot(last_rejection=Rejected(text, "manifest-invalid", "x", None))
        assert status(s, "cut:last-rejection") == "warn", text


def test_disk_warns_then_fails_and_recovers() -> None:
    def disk(percent: float) -> Snapshot:
        return snapshot(system=replace(CALM, disk_percent=percent))

    assert status(disk(DISK_WARN_PERCENT - 0.1), "disk:utilization") == "pass"
    assert status(disk(DISK_WARN_PERCENT), "disk:utilization") == "warn"
    assert status(disk(DISK_FAIL_PERCENT), "disk:utilization") == "fail"
    full = health_document(disk(DISK_FAIL_PERCENT))
    assert full["status"] == "fail" and full["output"] == "disk:utilization"
    assert status(disk(50.0), "disk:utilization") == "pass"


def test_memory_warns_and_recovers() -> None:
    def memory(percent: float) -> Snapshot:
        return snapshot(system=replace(CALM, memory_percent=percent))

    assert status(memory(MEMORY_WARN_PERCENT - 0.1), "memory:utilization") == "pass"
    doc = health_document(memory(MEMORY_WARN_PERCENT))
    assert doc["checks"]["memory:utilization"][0]["status"] == "warn"
    assert doc["checks"]["memory:utilization"][0]["observedValue"] == MEMORY_WARN_PERCENT
    assert doc["status"] == "warn" and doc["output"] == "memory:utilization"
    assert health_document(memory(60.0))["status"] == "pass"


def test_cpu_warns_and_recovers() -> None:
    def cpu(percent: float | None) -> Snapshot:
        return snapshot(system=replace(CALM, cpu_percent=percent))

    assert status(cpu(CPU_WARN_PERCENT - 0.1), "cpu:utilization") == "pass"
    doc = health_document(cpu(100.0))
    assert doc["checks"]["cpu:utilization"][0]["status"] == "warn"
    assert doc["status"] == "warn" and doc["output"] == "cpu:utilization"
    assert status(cpu(None), "cpu:utilization") == "pass"  # no window measured yet
    assert health_document(cpu(20.0))["status"] == "pass"


def test_public_view_has_no_host_checks_and_no_host_status() -> None:
    hot = SystemReadings(disk_percent=99.0, memory_percent=99.0, cpu_percent=100.0)
    assert health_document(snapshot(system=hot))["status"] == "fail"
    public = health_document(snapshot(system=None))
    assert set(public) == {"status", "serviceId", "time", "checks"}
    assert all(key.startswith("cut:") for key in public["checks"])
    assert public["status"] == "pass"
    # What the public view can know without the host still counts.
    assert health_document(snapshot(system=None, watcher_fallback=True))["status"] == "warn"
    assert health_document(snapshot(system=None, storage_writable=False))["status"] == "fail"


def test_only_a_privileged_health_request_asks_for_the_host() -> None:
    asked: list[bool] = []

    def take(full: bool) -> Snapshot:
        asked.append(full)
        return snapshot(system=CALM if full else None)

    app = create_app(take, Metrics(), "s3creto", allow=())
    client = app.test_client()
    outside = {"REMOTE_ADDR": "10.9.9.9"}
    public = client.get("/health", environ_base=outside)
    assert public.status_code == 200 and "version" not in public.get_json()
    for path in ("/readyz", "/livez", "/metrics"):
        client.get(path, environ_base=outside)
    client.get("/metrics", headers={"Authorization": "Bearer s3creto"}, environ_base=outside)
    assert asked == [False, False, False]  # public /health, /readyz, /metrics: not the host
    full = client.get("/health", headers={"Authorization": "Bearer s3creto"}, environ_base=outside)
    assert asked[-1] is True and "memory:utilization" in full.get_json()["checks"]


def test_probe_measures_cpu_over_a_window(tmp_path: Path) -> None:
    clock = [100.0]
    probe = SystemProbe(tmp_path, clock=lambda: clock[0])
    first = probe.read()
    assert first.cpu_percent is None  # psutil's first call only opens the window
    assert 0.0 <= first.disk_percent <= 100.0 and 0.0 < first.memory_percent <= 100.0
    clock[0] += CPU_WINDOW / 2
    assert probe.read().cpu_percent is None  # too soon: the window is not over
    clock[0] += CPU_WINDOW / 2
    measured = probe.read().cpu_percent
    assert measured is not None and 0.0 <= measured <= 100.0
    clock[0] += 1.0
    assert probe.read().cpu_percent == measured  # repeated until the next window ends
