"""The collector's pure parts: report checks, dashboard states, the store's bounds."""

from __future__ import annotations

import base64
import json
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from prep_agent.agent.keygen import allowed_signers_line
from prep_agent.core import sshsig
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.institute.collector.board import make_board
from prep_agent.institute.collector.store import CollectorDatabase, DifusorRecord, SignedCut
from prep_agent.institute.collector.verify import ReportRejected, check_report
from tests.kit import PREP_AGENT

NOW = datetime(2021, 6, 7, 2, 0, tzinfo=timezone.utc)
KEY = ed25519.Ed25519PrivateKey.generate()
OTHER = ed25519.Ed25519PrivateKey.generate()
SIGNERS = parse_allowed_signers(
    allowed_signers_line("diario-a", KEY) + "\n" + allowed_signers_line("diario-b", OTHER) + "\n"
)


def _push(
    sid: str = "diario-a",
    at: datetime = NOW,
    key: ed25519.Ed25519PrivateKey = KEY,
    namespace: str = "prep-health",
) -> tuple[bytes, str]:
    body = json.dumps({"serviceId": sid, "time": at.isoformat(), "status": "pass"}).encode()
    return body, base64.b64encode(sshsig.sign(key, body, namespace)).decode()


def _check(body: bytes, header: str | None, last: datetime | None = None) -> str:
    try:
        check_report(body, header, SIGNERS, {"diario-a", "diario-b"}, last, NOW, 300)
    except ReportRejected as exc:
        return exc.reason
    return "accepted"


@pytest.mark.core
def test_report_checks() -> None:
    body, header = _push()
    assert _check(body, header) == "accepted"
    assert _check(body, header, last=NOW) == "replay"
    assert _check(body, header, last=NOW - timedelta(milliseconds=1)) == "accepted"
    assert _check(*_push(at=NOW + timedelta(seconds=300))) == "accepted"
    assert _check(*_push(at=NOW + timedelta(seconds=301))) == "time-window"
    assert _check(*_push(at=NOW - timedelta(seconds=301))) == "time-window"
    assert _check(*_push(key=OTHER)) == "signature-untrusted"  # b's key, a's name
    assert _check(*_push(namespace="prep-cut")) == "signature-untrusted"
    assert _check(*_push(sid="diario-z")) == "unknown-difusor"
    assert _check(body + b" ", header) == "signature-untrusted"
    assert _check(body, None) == "signature-missing"
    assert _check(body, "***") == "signature-malformed"
    assert _check(b"[]", header) == "report-invalid"
    assert _check(b"x" * 300_000, header) == "too-large"


def _record(
    sid: str,
    seq: int | None,
    age: float | None,
    status: str = "pass",
    fail_since: float | None = None,
) -> DifusorRecord:
    doc = {
        "status": status,
        "checks": {
            "cut:sequence": [{"observedValue": seq}],
            "cut:time": [{"observedValue": "2021-06-06T19:50:00-06:00"}],
        },
    }
    at = NOW.timestamp() - age if age is not None else None
    return DifusorRecord(
        sid,
        NOW.timestamp() - 3600,
        at,
        "push" if at else None,
        doc if at else None,
        fail_since,
        None,
        None,
    )


def _cut(seq: int, minutes_ago: float) -> SignedCut:
    signed = NOW - timedelta(minutes=minutes_ago)
    return SignedCut(
        seq,
        "e",
        "2021-06-06T19:50:00-06:00",
        signed.isoformat(),
        600,
        False,
        signed.timestamp() + 5,
    )


@pytest.mark.core
def test_board_states_and_unlink_flag() -> None:
    cuts = [_cut(1, 40), _cut(2, 25), _cut(3, 5)]
    records = [
        _record("al-dia", 3, 10),
        _record("rezagado-poco", 2, 10),
        _record("rezagado-mucho", 1, 10),
        _record("callado", 3, 200),
        _record("callado-viejo", 3, 1900),
        _record("nunca", None, None),
        _record("falla", 3, 10, "fail", NOW.timestamp() - 60),
    ]
    board = make_board(records, {}, cuts, NOW, silent_after=180, unlink_periods=3)
    rows = {r.service_id: r for r in board.rows}
    states = {sid: (r.state, r.unlink) for sid, r in rows.items()}
    assert states == {
        "al-dia": ("al-dia", False),
        "rezagado-poco": ("rezagado", False),  # behind since cut 3, signed 5 min ago
        "rezagado-mucho": ("rezagado", False),  # since cut 2: 25 min < 3 x 10 min
        "callado": ("sin-reportes", False),
        "callado-viejo": ("sin-reportes", True),
        "nunca": ("sin-reportes", True),
        "falla": ("falla", False),
    }
    assert rows["al-dia"].failing_since is None and rows["al-dia"].behind == 0
    assert rows["rezagado-poco"].failing_for == 300 and rows["rezagado-poco"].behind == 1
    assert rows["rezagado-mucho"].failing_for == 1500 and not rows["rezagado-mucho"].unlink
    assert rows["callado-viejo"].failing_for == 1900 and rows["callado-viejo"].unlink
    assert rows["nunca"].failing_for == 3600 and rows["nunca"].unlink
    assert rows["falla"].state == "falla" and rows["falla"].failing_for == 60
    assert rows["callado"].state == "sin-reportes" and not rows["callado"].unlink
    assert board.unlink_after == 1800
    assert [r.service_id for r in board.rows][:2] == ["callado-viejo", "nunca"]
    assert board.counts()["desvincular"] == 2


@pytest.mark.core
def test_history_is_bounded(tmp_path: Path) -> None:
    store = CollectorDatabase(tmp_path / "c.sqlite", history_rows=150)
    store.register(["d"], NOW)
    for i in range(1000):
        store.record_poll("d", {"status": "pass", "time": str(i)}, NOW)
    assert 150 <= store.report_count() < 250
    assert store.history("d", 1)[0]["time"] == "999"
    store.close()


def test_record_cut_command(tmp_path: Path) -> None:
    (tmp_path / "allowed").write_text(allowed_signers_line("diario-a", KEY) + "\n")
    (tmp_path / "c.conf").write_text("[collector]\ntrust = allowed\n")
    manifest = {
        "format": "prep-cut/1",
        "election": "e",
        "sequence": 7,
        "cut_time": "2021-06-06T20:30:00-05:00",
        "signed_at": "2021-06-06T20:31:00-05:00",
        "entry": "a",
        "files": [{"path": "a", "size": 0, "sha256": "0" * 64}],
    }
    (tmp_path / "prep-manifest.json").write_text(json.dumps(manifest))
    cmd = [PREP_AGENT, "collector", "--config", str(tmp_path / "c.conf"), "--record-cut"]
    ok = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True)
    assert ok.returncode == 0 and "recorded signed cut 7" in ok.stdout, ok.stderr
    (tmp_path / "bad.json").write_text("{}")
    bad = subprocess.run([*cmd, str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "not a manifest" in bad.stderr
    store = CollectorDatabase(tmp_path / "collector.sqlite")
    assert [c.sequence for c in store.signed_cuts()] == [7]
    store.close()


@pytest.mark.parametrize(
    "line", ["[push]\nurls = ftp://x\nkey = k\n", "[push]\nurls = http://x/r\n"]
)
def test_push_config_errors(tmp_path: Path, line: str) -> None:
    conf = tmp_path / "a.conf"
    conf.write_text(f"[agent]\nelection = e\nroot = r\ninbox = i\ntrust = t\n{line}")
    proc = subprocess.run(
        [PREP_AGENT, "status", "--config", str(conf)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "[push]" in proc.stderr
