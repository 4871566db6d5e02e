"""``prep-agent rehearse``: a difusor that never shows the interruption notice
fails the rehearsal.

The rehearsal signs its cuts with an old cut_time (period_seconds 600), so a
difusor cut off from the institute for a few compressed periods must show the
notice; here difusor a runs with ``stale_periods = 1000`` (the ``notice-off``
defect) and is cut off: the viewer finds the notice missing, the network-cut
fault is not detected as the spec wants, and the verdict fails. Real processes
on loopback, as tests/test_rehearse.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_rehearse import rehearse

pytestmark = pytest.mark.drill


def test_a_difusor_that_never_shows_the_notice_fails_the_rehearsal(tmp_path: Path) -> None:
    schedule = tmp_path / "fallas.txt"
    schedule.write_text("2 notice-off a\n2 network-cut a\n", encoding="utf-8")
    out = tmp_path / "ensayo"
    args = ["--cuts", "6", "--period", "2", "--faults", str(schedule), "--no-browser"]
    args += ["--mode", "loopback", "--readers", "0"]  # no simulated frames (load.py)
    proc, doc = rehearse(out, *args)
    assert proc.returncode == 9, proc.stdout + proc.stderr
    assert doc["verdict"] == "fail"
    kinds = {f["kind"]: f for f in doc["faults"]}
    assert kinds["notice-off"]["status"] == "detected", kinds
    assert "viewer" in kinds["notice-off"]["detected_by"]
    cut_off = kinds["network-cut"]
    assert cut_off["status"] == "missed" and "notice was not shown" in cut_off["detail"]
    assert cut_off.get("notice_shown_at") is None
    assert any(p.startswith("viewer of a: notice") for p in doc["problems"]), doc["problems"]
    assert not any(p.startswith(("viewer of b", "viewer of c")) for p in doc["problems"])
    assert all(n["shown_at"] is None for n in doc["notices"]["a"]), doc["notices"]
    assert doc["notices"]["a"], doc["notices"]
    assert doc["load"] == {"readers": 0, "difusores": {}}
