"""Attacks and containment in the memoria técnica, from real nginx and fail2ban log lines.

tests/data/edge/ holds lines written by a real nginx (limit_req, ModSecurity)
and a real fail2ban during tests/test_edge_dos.py (see its README.md).
"""

from __future__ import annotations

import csv
import json
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from prep_agent.report.edge import parse_offset, read_edge
from tests.kit import PREP_AGENT

DATA = Path(__file__).resolve().parent / "data" / "edge"
ERROR_LOG = DATA / "error.log"
FAIL2BAN_LOG = DATA / "fail2ban.log"
MX = timezone(timedelta(hours=-6))
WINDOW = (datetime(2026, 11, 30, 16, 0, tzinfo=MX), datetime(2026, 11, 30, 18, 0, tzinfo=MX))
"""The operation window around the captured lines (22:45 UTC = 16:45 -06:00)."""


@pytest.mark.core
def test_rate_limits_waf_blocks_and_bans_counted_per_hour() -> None:
    edge = read_edge([ERROR_LOG], [FAIL2BAN_LOG], WINDOW, timezone.utc, MX)
    hour = datetime(2026, 11, 30, 16, 0, tzinfo=MX)
    assert dict(edge.limited) == {hour: 60}
    assert edge.limited_clients[hour] == {"127.0.0.30", "127.0.0.60"}
    assert dict(edge.blocked) == {hour: 12}
    assert edge.blocked_clients[hour] == {"127.0.0.31", "127.0.0.60"}
    assert [(b.jail, b.address) for b in edge.bans] == [
        ("nginx-limit-req", "127.0.0.30"),
        ("prep-agent-modsecurity", "127.0.0.31"),
    ]
    assert all(b.end is not None and 7 <= (b.end - b.start).total_seconds() <= 9 for b in edge.bans)
    assert edge.per_client["127.0.0.60"] == {"limited": 30, "blocked": 6, "bans": 0}


@pytest.mark.core
def test_the_window_and_the_log_offset_are_applied() -> None:
    # The same lines read as if logged at UTC-6 fall 6 hours later: outside the window.
    late = read_edge([ERROR_LOG], [FAIL2BAN_LOG], WINDOW, parse_offset("-06:00"), MX)
    assert not late.limited and not late.blocked and not late.bans
    before = (WINDOW[0] - timedelta(hours=2), WINDOW[0])
    assert not read_edge([ERROR_LOG], [FAIL2BAN_LOG], before, timezone.utc, MX).bans
    with pytest.raises(ValueError):
        parse_offset("6")


def test_report_command_writes_the_incidents_section(tmp_path: Path) -> None:
    access = tmp_path / "access.log"
    access.write_text(
        '127.0.0.40 - - [30/Nov/2026:22:45:30 +0000] "GET /status.json HTTP/1.1" 200 390 "-" '
        '"Mozilla/5.0" 0.000\n'
        '127.0.0.40 - - [29/Nov/2026:22:45:30 +0000] "GET / HTTP/1.1" 200 1864 "-" '
        '"Mozilla/5.0" 0.000\n'
    )
    out = tmp_path / "report"
    done = subprocess.run(
        [
            PREP_AGENT,
            "report",
            "--access-log",
            str(access),
            "--error-log",
            str(ERROR_LOG),
            "--fail2ban-log",
            str(FAIL2BAN_LOG),
            "--from",
            "2026-11-30T16:00:00-06:00",
            "--to",
            "2026-11-30T18:00:00-06:00",
            "--baseline-from",
            "2026-11-29T16:00:00-06:00",
            "--baseline-to",
            "2026-11-29T18:00:00-06:00",
            "--out",
            str(out),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    totals = {"rate_limited": 60, "waf_blocks": 12, "bans": 2, "clients": 3}
    assert summary["edge"]["totals"] == totals
    assert summary["edge"]["hourly"] == [
        {
            "hour": "2026-11-30T16:00:00-06:00",
            "rate_limited": 60,
            "rate_limited_clients": 2,
            "waf_blocks": 12,
            "waf_clients": 2,
            "bans": 2,
        }
    ]
    with open(out / "bloqueos_fail2ban.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["jail"], r["address"], r["seconds"]) for r in rows] == [
        ("nginx-limit-req", "127.0.0.30", "8"),
        ("prep-agent-modsecurity", "127.0.0.31", "8"),
    ]
    page = (out / "memoria-tecnica.html").read_text(encoding="utf-8")
    assert "<h3>Ataques y contención</h3>" in page
    assert "el cortafuegos de aplicaciones bloqueó 12" in page
    assert "127.0.0.31" in page
    sums = (out / "SHA256SUMS").read_text()
    assert "ataques_por_hora.csv" in sums and "bloqueos_fail2ban.csv" in sums
