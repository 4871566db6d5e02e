"""CSV exports cannot carry spreadsheet formulas (CSV injection).

Text that others control (a difusor's health document, an access log line, a
journal detail) reaches the collector's ``/difusores.csv`` and the report's
CSVs; a cell starting with ``=``, ``+``, ``-``, ``@``, tab or CR is written with
a leading ``'``. Numbers we computed stay numbers.
"""

from __future__ import annotations

import argparse
import csv
import io
from datetime import datetime, timezone
from pathlib import Path

import pytest
import requests

from prep_agent.core.csvcell import csv_safe
from prep_agent.report import generate as report
from tests import reportkit as rk
from tests.collectorkit import CollectorProc, keygen, signed
from tests.kit import free_port

PAYLOADS = ('=HYPERLINK("http://x.example/","clic")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1")


@pytest.mark.core
def test_csv_safe_prefixes_formula_starts_and_leaves_the_rest() -> None:
    for text in PAYLOADS:
        assert csv_safe(text) == "'" + text
    for value in ("1", "texto", "", "'=ya", " =1", "2021-06-06", "/=cmd", 0, -5, -1.5, True):
        assert csv_safe(value) == value and type(csv_safe(value)) is type(value)


def test_collector_csv_neutralises_what_a_difusor_sends(tmp_path: Path) -> None:
    key = tmp_path / "report_key"
    trust = tmp_path / "difusores_allowed_signers"
    trust.write_text(keygen(key, "diario-f") + "\n")
    (tmp_path / "salida").mkdir()
    (tmp_path / "collector").mkdir()
    collector = CollectorProc(tmp_path / "collector", free_port(), tmp_path / "salida", trust)
    collector.poll = False
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    doc = {
        "serviceId": "diario-f",
        "time": now,
        "status": PAYLOADS[0],
        "output": "+cmd|' /C calc'!A0",
        "checks": {
            "cut:sequence": [{"observedValue": -3}],
            "cut:time": [{"observedValue": "@SUM(1+1)"}],
        },
    }
    collector.start()
    try:
        assert collector.post(*signed(doc, key)).status_code == 202
        text = requests.get(collector.url + "/difusores.csv", timeout=5).text
        api_row = collector.rows()["diario-f"]
    finally:
        collector.stop()
    (row,) = csv.DictReader(io.StringIO(text))
    assert row["status"] == "'" + PAYLOADS[0]
    assert row["output"] == "'+cmd|' /C calc'!A0"
    assert row["cut_time"] == "'@SUM(1+1)"
    assert row["sequence"] == "-3"  # a number stays a number
    assert row["service_id"] == "diario-f"
    # Only the CSV is escaped: the API keeps what was sent.
    assert api_row["status"] == PAYLOADS[0] and api_row["cut_time"] == "@SUM(1+1)"


def test_report_csvs_neutralise_log_lines_and_journal_details(tmp_path: Path) -> None:
    logs = tmp_path / "access.log"
    cmd = "=cmd|' /C calc'!A0"
    logs.write_text(
        '10.0.0.1 - - [06/Jun/2021:20:15:01 -0500] "GET / HTTP/1.1" 200 512 "-" "Mozilla"\n'
        f'{cmd} - - [06/Jun/2021:20:15:02 -0500] "GET / HTTP/1.1" 200 1 "-" "{cmd}"\n'
        "-2+3+cmd|' /C calc'!A0\n"
        "@SUM(1+1)\n"
    )
    journal = tmp_path / "journal.jsonl"
    start = rk.ELECTION_START
    rejected = {
        "time": start,
        "event": "cut-rejected",
        "reason": "stamp-mismatch",
        "detail": PAYLOADS[0],
        "sequence": 3,
    }
    rk.write_journal(journal, [{"time": start, "event": "agent-started"}, rejected])
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    args = [
        "--access-log",
        str(logs),
        "--journal",
        str(journal),
        "--from",
        "2021-06-06T00:00:00-05:00",
        "--to",
        "2021-06-08T00:00:00-05:00",
        "--baseline-from",
        "2021-06-04T00:00:00-05:00",
        "--baseline-to",
        "2021-06-06T00:00:00-05:00",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert report.cmd_report(parser.parse_args(args)) == 0

    samples = [r["text"] for r in _read(out / "lineas_invalidas.csv")]
    assert samples == [
        f'\'{cmd} - - [06/Jun/2021:20:15:02 -0500] "GET / HTTP/1.1" 200 1 "-" "{cmd}"',
        "'-2+3+cmd|' /C calc'!A0",
        "'@SUM(1+1)",
    ]
    (rejection,) = _read(out / "rechazos.csv")
    assert rejection["detail"] == "'" + PAYLOADS[0] and rejection["sequence"] == "3"
    for row in _read(out / "dias.csv"):  # numbers unescaped
        assert not any(v.startswith("'") for v in row.values()), row


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))
