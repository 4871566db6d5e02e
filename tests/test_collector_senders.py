"""Refused pushes whose signature did not verify are the sender's, not a difusor's.

Anyone can POST a body that claims a registered ``serviceId``; until the
signature verifies, the claim proves nothing, so the collector counts the
refusal under the sender's address ("desconocido (192.0.2.7)") and never under
the difusor. Late or replayed reports that do verify stay the difusor's.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from prep_agent.institute.collector.store import MAX_SENDER_ROWS, CollectorDatabase
from tests.collectorkit import CollectorProc, keygen, signed
from tests.kit import free_port

NOW = datetime(2021, 6, 7, 2, 0, tzinfo=timezone.utc)
ROW_FIELDS = ("state", "status", "sequence", "cut_time", "last_report", "source", "output")
"""Fields of a dashboard row that a report (accepted or not) would change."""


def _report(sid: str, moment: datetime, status: str = "pass") -> dict[str, Any]:
    return {
        "serviceId": sid,
        "time": moment.isoformat(timespec="milliseconds"),
        "status": status,
        "checks": {"cut:sequence": [{"observedValue": 7}]},
    }


def _post(url: str, body: bytes, signature: str | None, via: str | None = None) -> str:
    headers = {"Content-Type": "application/health+json"}
    if signature is not None:
        headers["PREP-Signature"] = signature
    if via is not None:
        headers["X-Forwarded-For"] = via  # the collector trusts it from 127.0.0.1 (a proxy)
    response = requests.post(url + "/reports", data=body, headers=headers, timeout=5)
    reason: str = response.json().get("reason", "accepted")
    return reason


def _csv_row(collector: CollectorProc, sid: str) -> dict[str, str]:
    text = requests.get(collector.url + "/difusores.csv", timeout=5).text
    return next(r for r in csv.DictReader(io.StringIO(text)) if r["service_id"] == sid)


def test_unverified_pushes_name_the_sender_not_the_difusor(tmp_path: Path) -> None:
    key = tmp_path / "diario-a.key"
    stranger = tmp_path / "stranger.key"
    trust = tmp_path / "difusores_allowed_signers"
    trust.write_text(keygen(key, "diario-a") + "\n")
    keygen(stranger, "diario-a")  # a key of the right shape the collector does not trust
    (tmp_path / "salida").mkdir()
    (tmp_path / "collector").mkdir()
    collector = CollectorProc(tmp_path / "collector", free_port(), tmp_path / "salida", trust)
    collector.poll = False
    collector.start()
    try:
        now = datetime.now(timezone.utc)
        genuine, genuine_sig = signed(_report("diario-a", now), key)
        assert _post(collector.url, genuine, genuine_sig) == "accepted"
        row = {k: collector.rows()["diario-a"][k] for k in ROW_FIELDS}
        csv_row = {k: _csv_row(collector, "diario-a")[k] for k in ROW_FIELDS}

        later = now + timedelta(seconds=1)
        forged = signed(_report("diario-a", later, "fail"), stranger)
        assert _post(collector.url, *forged, via="192.0.2.7") == "signature-untrusted"
        unsigned = json.dumps(_report("diario-a", later, "fail")).encode()
        assert _post(collector.url, unsigned, None, via="192.0.2.7") == "signature-missing"
        tampered = genuine.replace(b'"pass"', b'"fail"')
        assert _post(collector.url, tampered, genuine_sig) == "signature-untrusted"
        bad_time = signed({"serviceId": "diario-a", "time": "ayer"}, key)
        assert _post(collector.url, *bad_time, via="192.0.2.7") == "report-invalid"
        # Verified, but a replay: the difusor's own report, so it stays the difusor's.
        assert _post(collector.url, genuine, genuine_sig) == "replay"

        assert {k: collector.rows()["diario-a"][k] for k in ROW_FIELDS} == row
        assert {k: _csv_row(collector, "diario-a")[k] for k in ROW_FIELDS} == csv_row
        found = {
            (r["reason"], r["serviceId"], r["sender"]): r["count"]
            for r in collector.api()["rejections"]
        }
        html = requests.get(collector.url + "/", timeout=5).text
    finally:
        collector.stop()
    assert found == {
        ("signature-untrusted", None, "192.0.2.7"): 1,
        ("signature-untrusted", None, "127.0.0.1"): 1,
        ("signature-missing", None, "192.0.2.7"): 1,
        ("report-invalid", None, "192.0.2.7"): 1,
        ("replay", "diario-a", None): 1,
    }, found
    assert "desconocido (192.0.2.7)" in html and "desconocido (127.0.0.1)" in html


@pytest.mark.core
def test_rows_per_sender_are_bounded(tmp_path: Path) -> None:
    store = CollectorDatabase(tmp_path / "c.sqlite")
    store.count_rejection("replay", "diario-a", "late", NOW)
    for i in range(MAX_SENDER_ROWS + 50):
        at = NOW + timedelta(seconds=i)
        store.count_rejection("signature-missing", "", "no header", at, sender=f"2001:db8::{i:x}")
    rows = store.rejections()
    store.close()
    senders = [r["sender"] for r in rows if r["sender"]]
    assert len(senders) == MAX_SENDER_ROWS
    assert f"2001:db8::{MAX_SENDER_ROWS + 49:x}" in senders and "2001:db8::0" not in senders
    assert [r["serviceId"] for r in rows if not r["sender"]] == ["diario-a"]


@pytest.mark.core
def test_database_from_before_senders_keeps_its_counts(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    old = sqlite3.connect(str(path))
    old.executescript(
        "CREATE TABLE rejection (reason TEXT NOT NULL, difusor TEXT NOT NULL, "
        "count INTEGER NOT NULL, last_at REAL NOT NULL, last_detail TEXT, "
        "PRIMARY KEY (reason, difusor));"
        f"INSERT INTO rejection VALUES ('replay', 'diario-a', 4, {NOW.timestamp()}, 'x');"
    )
    old.close()
    store = CollectorDatabase(path)
    store.count_rejection("replay", "diario-a", "y", NOW)
    store.count_rejection("signature-missing", "", "z", NOW, sender="192.0.2.7")
    rows = store.rejections()
    store.close()
    assert [(r["reason"], r["serviceId"], r["sender"], r["count"]) for r in rows] == [
        ("replay", "diario-a", None, 5),
        ("signature-missing", None, "192.0.2.7", 1),
    ]
