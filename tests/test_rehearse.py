"""``prep-agent rehearse``: a short night with every fault kind passes; a difusor
serving a modified file makes it fail.

The command runs as a real process and builds its own stand (sshd, agents,
collector, distribute, simulate) on loopback; as root (CI) the disk-full fault
gets a real tmpfs; the first test also watches the frames in headless Chromium.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from prep_agent.rehearsal.browser import unavailable
from tests.kit import PREP_AGENT

pytestmark = pytest.mark.drill

INJECTED = {"kill-agent", "bad-signature", "network-cut", "replay", "disk-full", "clock-skew"}
"""Kinds the loopback rehearsal injects (disk-full only as root)."""
NOT_AVAILABLE = {"balancer-kill", "origin-stop"}


def rehearse(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = subprocess.run(
        [PREP_AGENT, "rehearse", "--out", str(out), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = out / "rehearsal.json"
    assert report.exists(), proc.stdout + proc.stderr
    doc: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    return proc, doc


def check_load(doc: dict[str, Any], difusores: set[str], readers: int) -> None:
    """The simulated frames read every difusor, and the verdict judged what they saw."""
    load = doc["load"]
    assert load["readers"] == readers and set(load["difusores"]) == difusores, load
    for sid, part in load["difusores"].items():
        assert part["readers"] == readers and part["poll_seconds"] == 5, part
        assert part["requests"] > 0 and part["answers"].get("200", 0) > 0, (sid, part)
        assert part["latency_ms"]["p50"] is not None, part
        # Judged (report.judge_findings): a counted one is a "load of" problem.
        assert {f["kind"] for f in part["findings"]} <= {"error", "backwards"}, part


def test_short_night_with_every_fault_passes(tmp_path: Path) -> None:
    out = tmp_path / "ensayo"
    proc, doc = rehearse(out, "--cuts", "8", "--period", "2", "--mode", "loopback")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert doc["verdict"] == "pass" and doc["problems"] == []
    assert [d["service_id"] for d in doc["difusores"]] == ["a", "b", "c"]
    assert [c["sequence"] for c in doc["cuts"]] == list(range(1, 9))
    for cut in doc["cuts"]:
        assert set(cut["difusores"]) == {"a", "b", "c"}
        for entry in cut["difusores"].values():
            assert set(entry) == {"delivered", "published", "first_seen", "first_seen_browser"}
    last = doc["cuts"][-1]["difusores"]
    assert all(last[d]["published"] for d in last), last  # every difusor ends on the final cut
    kinds = {f["kind"]: f for f in doc["faults"]}
    assert set(kinds) == INJECTED | NOT_AVAILABLE
    injected = INJECTED if os.geteuid() == 0 else INJECTED - {"disk-full"}
    for kind in injected:
        fault = kinds[kind]
        assert fault["status"] == "detected", fault
        assert fault["injected_at"] <= fault["detected_at"], fault
        assert fault["detected_by"], fault
    skewed = kinds["clock-skew"]  # libfaketime: a real wall clock 900 s behind
    assert skewed["agent_clock_offset"] < -800 and skewed["refused_by"] == ["agent", "collector"]
    cut_off = kinds["network-cut"]
    assert cut_off["relinked_at"] > cut_off["detected_at"]
    flagged = [s for s in doc["collector_timeline"] if s["difusores"]["b"]["unlink"]]
    assert flagged and not flagged[0]["difusores"]["b"]["listed"]
    assert doc["collector_timeline"][-1]["difusores"]["b"]["listed"]
    # Cuts are signed with an old cut_time, so the cut-off difusor's notice comes due.
    assert cut_off["injected_at"] < cut_off["notice_shown_at"] <= cut_off["relinked_at"]
    due = [n for n in doc["notices"]["b"] if n["due_at"] > cut_off["injected_at"]]
    assert due and due[0]["shown_at"], doc["notices"]
    assert due[0]["due_at"] <= due[0]["shown_at"] <= cut_off["relinked_at"]
    if unavailable() is None:
        assert due[0]["shown_browser_at"], doc["notices"]
    for kind in NOT_AVAILABLE:
        assert kinds[kind]["status"] == "not-available" and kinds[kind]["detected_at"] is None
    assert doc["latency_seconds"]["visible"]["n"] > 0
    if unavailable() is None:  # Debian's chromium and selenium, as tests/test_browser.py uses
        assert doc["browser"]["ran"] and doc["browser"]["error"] is None, doc["browser"]
        assert doc["latency_seconds"]["visible_browser"]["n"] > 0
        assert (out / doc["browser"]["screenshot"]).is_file()
    for d in doc["difusores"]:
        assert (out / d["memoria"] / "memoria-tecnica.html").is_file(), d
    check_load(doc, {"a", "b", "c"}, readers=25)
    check_skewed_memoria(out, doc, skewed["difusor"])
    page = (out / "rehearsal.html").read_text(encoding="utf-8")
    assert "Veredicto: <strong>APROBADO</strong>" in page
    assert "Carga HTTP de marcos simulados" in page


def check_skewed_memoria(out: Path, doc: dict[str, Any], sid: str) -> None:
    """The memoria técnica of the difusor whose agent ran 900 s behind holds every
    publication and rejection of its journal, each within the night, and the step
    of its clock."""
    entry = next(d for d in doc["difusores"] if d["service_id"] == sid)
    summary = json.loads((out / entry["memoria"] / "summary.json").read_text(encoding="utf-8"))
    incidents = summary["incidents"]
    lines = (out / "difusores" / sid / "journal.jsonl").read_text(encoding="utf-8")
    events = [json.loads(line)["event"] for line in lines.splitlines()]
    assert len(incidents["cuts"]) == events.count("cut-published"), incidents["cuts"]
    assert len(incidents["rejected"]) == events.count("cut-rejected") > 0, incidents
    start, end = doc["started"], doc["ended"]  # RFC 3339 UTC, comparable as text
    times = [c["published"] for c in incidents["cuts"]] + [r["time"] for r in incidents["rejected"]]
    assert all(start[:19] <= t[:19] <= end[:19] for t in times), (start, end, times)
    steps = [o for o in incidents["other"] if o["event"] == "clock-behind"]
    assert steps and steps[0]["detail"]["seconds"] > 800, incidents["other"]


def test_a_modified_file_on_a_difusor_fails_the_rehearsal(tmp_path: Path) -> None:
    schedule = tmp_path / "fallas.txt"
    schedule.write_text("# a defect, not a fault\n3 tamper a\n", encoding="utf-8")
    out = tmp_path / "ensayo"
    args = ["--cuts", "6", "--period", "2", "--faults", str(schedule), "--no-browser"]
    proc, doc = rehearse(out, *args, "--mode", "loopback", "--readers", "5")
    assert proc.returncode == 9, proc.stdout + proc.stderr
    assert doc["verdict"] == "fail"
    (tamper,) = doc["faults"]
    assert tamper["status"] == "detected" and "collector audit" in tamper["detected_by"]
    assert "the public copy of a was found altered" in doc["problems"]
    assert any(p.startswith("viewer of a: mixed") for p in doc["problems"]), doc["problems"]
    assert not any(p.startswith(("viewer of b", "viewer of c")) for p in doc["problems"])
    assert not any(p.startswith("load of") for p in doc["problems"]), doc["problems"]
    assert doc["browser"] == {"ran": False, "why": "not asked for"}
    check_load(doc, {"a", "b", "c"}, readers=5)
    assert "NO APROBADO" in (out / "rehearsal.html").read_text(encoding="utf-8")
