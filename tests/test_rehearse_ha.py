"""The rehearsal's HA pair, its faults and the clock skew: how the verdict judges
them (the records of a night, real report code), that libfaketime really moves
a Python process's wall clock, and the checks the namespace rehearsal
(tests/test_rehearse_netns.py) applies to a real night's report.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from prep_agent.rehearsal import report, skew
from prep_agent.rehearsal.viewer import Finding, Viewer

PERIOD = 2.0


def night(findings: list[Finding], faults: list[dict[str, Any]]) -> dict[str, Any]:
    """The records of a two-cut night of the pair ``h`` alone, read by one viewer."""
    start = 1_000_000.0
    viewer = Viewer("h", "http://198.19.1.100", Path("allowed_signers"))
    viewer.findings = findings
    viewer.first_seen = {1: start + 1, 2: start + 3}
    return {
        "options": {"period": PERIOD, "mode": "netns"},
        "started": start,
        "ended": start + 60,
        "placed": {1: start, 2: start + 2},
        "difusores": [{"service_id": "h", "url": viewer.url, "kind": "ha-pair"}],
        "journals": {"h": {1: start + 0.5, 2: start + 2.5}},
        "deliveries": {},
        "viewers": {"h": viewer},
        "browser": None,
        "browser_unavailable": "not asked for",
        "faults": faults,
        "timeline": [],
        "memorias": {},
        "pair": {"vip": "198.19.1.100", "ready_at": start + 0.6, "origins": ["h1", "h2"],
                 "balancers": ["lb1", "lb2"], "lag": 1196},
    }  # fmt: skip


def balancer_kill(at: float, end: float) -> dict[str, Any]:
    return {"kind": "balancer-kill", "difusor": "h", "at_cut": 2, "injected_at": at,
            "expected": "", "detected_at": at + 3, "detected_by": "keepalived on lb2",
            "detail": "", "status": "detected", "window": [at, end], "strict_window": True,
            "failover_seconds": end - at}  # fmt: skip


@pytest.mark.core
def test_pair_errors_count_only_outside_the_measured_failover_window() -> None:
    start = 1_000_000.0
    fault = balancer_kill(start + 10, start + 13)
    inside = [Finding(start + 11, "error", "status.json: HTTP 0")]
    doc = report.build(night(inside, [fault]))
    assert doc["verdict"] == "pass", doc["problems"]
    assert doc["ha_pair"]["ran"] and doc["ha_pair"]["vip"] == "198.19.1.100"
    # The strict window: one error a second after the address answered again fails,
    # where any other fault's window would excuse it for two more periods.
    after = [*inside, Finding(start + 14, "error", "status.json: HTTP 0")]
    doc = report.build(night(after, [fault]))
    assert doc["verdict"] == "fail"
    assert doc["problems"][0].startswith("viewer of h: error (1 times"), doc["problems"]


@pytest.mark.core
def test_pair_errors_before_it_served_a_cut_are_excused_but_not_after() -> None:
    start = 1_000_000.0
    early = [Finding(start + 0.2, "error", "status.json: HTTP 503")]
    assert report.build(night(early, []))["verdict"] == "pass"
    late = [Finding(start + 0.6 + report.FRAME_POLL + 1, "error", "status.json: HTTP 503")]
    assert report.build(night(late, []))["verdict"] == "fail"


@pytest.mark.core
def test_an_undetected_clock_skew_or_origin_stop_fails_the_verdict() -> None:
    start = 1_000_000.0
    for kind, sid in (("clock-skew", "a"), ("origin-stop", "h1")):
        fault = {"kind": kind, "difusor": sid, "at_cut": 1, "injected_at": start + 1,
                 "expected": "", "detected_at": None, "detected_by": None,
                 "detail": "not seen: collector", "status": "missed", "window": None}  # fmt: skip
        doc = report.build(night([], [fault]))
        assert doc["verdict"] == "fail"
        assert any(p.startswith(f"fault {kind} ({sid}) not detected") for p in doc["problems"])


def test_libfaketime_moves_pythons_wall_clock_and_not_its_monotonic_one() -> None:
    lib = skew.library()
    if lib is None:
        pytest.skip("Debian's faketime is not installed (scripts/install-deps)")
    code = (
        "import json, time, datetime, threading\n"
        "t = time.monotonic(); threading.Event().wait(0.2)\n"
        "print(json.dumps([time.time(), datetime.datetime.now(datetime.timezone.utc)"
        ".timestamp(), time.monotonic() - t]))\n"
    )
    done = subprocess.run(
        [*skew.wrapper(lib), sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    wall, aware, waited = json.loads(done.stdout)
    now = time.time()
    assert abs(wall - (now - skew.SKEW)) < 10, (wall, now)
    assert abs(aware - (now - skew.SKEW)) < 10, (aware, now)
    assert 0.15 < waited < 5  # timed waits still end (the monotonic clock is not faked)


def check_pair_and_every_fault(doc: dict[str, Any], out: Path) -> None:
    """What a namespace night's report must hold for the HA pair and every fault kind
    (called by tests/test_rehearse_netns.py on a real night)."""
    pair = doc["ha_pair"]
    assert pair["ran"] and pair["origins"] == ["h1", "h2"], pair
    kinds = {f["kind"]: f for f in doc["faults"]}
    every = {"kill-agent", "disk-full", "network-cut", "bad-signature", "replay", "clock-skew",
             "balancer-kill", "origin-stop"}  # fmt: skip
    assert set(kinds) == every, sorted(kinds)
    for fault in kinds.values():
        assert fault["status"] == "detected", fault
        assert fault["injected_at"] <= fault["detected_at"], fault
    skewed = kinds["clock-skew"]
    assert skewed["agent_clock_offset"] < -800 and skewed["refused_by"] == ["agent", "collector"]
    killed = kinds["balancer-kill"]
    assert "keepalived on lb2" in killed["detected_by"], killed
    assert 0 < killed["failover_seconds"] < 15, killed
    stopped = kinds["origin-stop"]
    assert stopped["difusor"] == "h1" and set(stopped["noticed_by"]) == {"collector", "haproxy"}
    assert stopped["caught_up_at"] > stopped["detected_at"], stopped
    # Readers of the pair (through the floating address) saw no error past the excuses.
    assert not [p for p in doc["problems"] if " of h:" in p], doc["problems"]
    assert doc["viewer_findings"]["h"] is not None
    # Through the floating address: Varnish keeps status.json up to its 5 s max-age
    # (a soft purge after each swap shortens it), so a cut replaced within 2 s may
    # never be shown there; most are.
    seen = [c["difusores"]["h"]["first_seen"] for c in doc["cuts"]]
    assert sum(1 for s in seen if s) >= len(seen) // 2, seen
    assert (out / "balanceadores" / "lb1" / "haproxy.cfg").is_file()
