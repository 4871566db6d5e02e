"""``prep-agent report`` end to end, and the incident report from the journal."""

from __future__ import annotations

import argparse
import csv
import json
import re
import shutil
import subprocess
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from prep_agent.core.errors import ConfigError
from prep_agent.report import generate as report
from prep_agent.report.incidents import read_incidents
from tests import reportkit as rk

UTC = timezone.utc
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
OP = (rk.ELECTION_START, rk.ELECTION_END)


def cut(t: datetime, seq: int, cut_time: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "time": t,
        "event": "cut-published",
        "sequence": seq,
        "cut_time": cut_time.isoformat(),
        "release": f"{seq:06d}-ab",
        "total_ms": 400.0 + seq,
        "since_seen_ms": 1500.0,
        **extra,
    }


def journal_events() -> list[dict[str, Any]]:
    s = rk.ELECTION_START
    return [
        {"time": s - timedelta(minutes=5), "event": "agent-started", "watcher": "inotify"},
        cut(s + timedelta(minutes=1), 1, s),
        cut(s + timedelta(minutes=11), 2, s + timedelta(minutes=10)),
        {
            "time": s + timedelta(minutes=21),
            "event": "cut-rejected",
            "reason": "signature-untrusted",
            "detail": "signed by 0/1 keys",
            "sequence": 3,
            "quarantine": "/q/3",
        },
        # crash: no agent-stopped; last event before the restart is at +21 min
        {"time": s + timedelta(minutes=55), "event": "agent-started", "watcher": "inotify"},
        # cut 2 (cut_time +10) is stale from +40 min until cut 4 is published at +56
        cut(s + timedelta(minutes=56), 4, s + timedelta(minutes=50)),
        {"time": s + timedelta(minutes=57), "event": "agent-error", "detail": "disk full"},
        {"time": s + timedelta(minutes=60), "event": "agent-stopped"},
        {"time": s + timedelta(minutes=70), "event": "agent-started", "watcher": "polling"},
        cut(s + timedelta(minutes=71), 5, s + timedelta(minutes=70), final=True),
    ]


@pytest.mark.core
def test_incidents_from_the_journal() -> None:
    events = journal_events()
    for e in events:
        e["time"] = e["time"].astimezone(UTC).isoformat()
    events.insert(3, {"time": "not a time", "event": "cut-seen"})
    inc = read_incidents(events, OP)
    s = rk.ELECTION_START
    assert [c.sequence for c in inc.cuts] == [1, 2, 4, 5]
    assert inc.cuts[0].delay_s == 60 and inc.cuts[0].received == s + timedelta(seconds=58.5)
    assert [(r["sequence"], r["reason"]) for r in inc.rejected] == [(3, "signature-untrusted")]
    assert [(w.start, w.end, w.note) for w in inc.stale] == [
        (s + timedelta(minutes=40), s + timedelta(minutes=56), "")
    ]  # cut 1 replaced in time; cut 4 replaced at +71 (stale at +80); cut 5 is final
    assert [(w.start, w.end, w.note) for w in inc.downtime] == [
        (s + timedelta(minutes=21), s + timedelta(minutes=55), "crash"),
        (s + timedelta(minutes=60), s + timedelta(minutes=70), "stopped"),
    ]
    assert [o["event"] for o in inc.other] == ["agent-error"]
    assert inc.bad_lines == 1
    assert inc.latency_stats()["total_ms_max"] == 405.0


@pytest.mark.core
def test_stale_after_the_last_cut_runs_to_the_end_of_the_window() -> None:
    s = rk.ELECTION_START
    events = [cut(s, 1, s, period_seconds=300)]
    events[0]["time"] = s.isoformat()
    inc = read_incidents(events, OP, period_seconds=600, stale_periods=3)
    assert [(w.start, w.end, w.note) for w in inc.stale] == [
        (s + timedelta(minutes=15), rk.ELECTION_END, "after_last_cut")
    ]


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    report.add_arguments(parser)
    return report.cmd_report(parser.parse_args(argv))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    logs = tmp / "logs"
    logs.mkdir()
    rk.generate(logs / "access.log", 20_000, seed=5)
    rk.gzip_file(logs / "access.log", logs / "access.log.1.gz")
    (logs / "access.log").write_text(
        '10.0.0.1 - - [09/Jun/2021:10:00:00 -0500] "GET / HTTP/1.1" 200 1 "-" "A"\n'
    )
    (logs / "old.log").write_text(
        '10.0.0.1 - - [01/Jun/2021:10:00:00 -0500] "GET / HTTP/1.1" 200 1 "-" "A"\n'
        "garbage <script>alert(1)</script>\n"
    )
    journal = tmp / "journal.jsonl"
    rk.write_journal(journal, journal_events())
    comments = tmp / "comments.txt"
    comments.write_text("Sin incidentes mayores <b>.</b>")
    out = tmp / "out"
    argv = [
        "--access-log",
        str(logs / "access.log"),
        str(logs / "access.log.1.gz"),
        str(logs / "old.log"),
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
        "--comments",
        str(comments),
        "--pdf",
        "--archive",
        "--no-progress",
    ]
    assert run_cli(argv) == 0
    return out


def test_report_files_and_summary(made: Path) -> None:
    doc = json.loads((made / "summary.json").read_text())
    assert [d["date"] for d in doc["operation"]["days"]] == ["2021-06-06", "2021-06-07"]
    assert [d["date"] for d in doc["baseline"]["days"]] == ["2021-06-04", "2021-06-05"]
    for d in doc["operation"]["days"] + doc["baseline"]["days"]:
        assert d["hits"] > d["pages"] > d["visits"] > 0 and d["unique_visitors"] > 0
        assert d["all"]["hits"] == d["hits"] + d["bots"]["hits"]
    assert doc["input"]["garbage_lines"] == 1 and doc["input"]["outside_windows"] == 2
    assert doc["incidents"]["rejected"][0]["reason"] == "signature-untrusted"
    assert doc["availability"]["cuts_published"] == 4
    with open(made / "dias.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and int(rows[2]["visits"]) == doc["operation"]["days"][0]["visits"]
    with open(made / "cortes.csv", encoding="utf-8") as fh:
        assert [r["sequence"] for r in csv.DictReader(fh)] == ["1", "2", "4", "5"]
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=made).returncode == 0


def test_html_is_self_contained_escaped_and_spanish(made: Path) -> None:
    page = (made / "memoria-tecnica.html").read_text()
    assert '<html lang="es-MX">' in page and "Reporte de incidencias" in page
    assert page.count("<svg") == 3  # the charts, inline SVG
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert re.findall(r'(?:src|href)="(?!#)', page) == []  # only links inside the SVGs
    assert "&lt;script&gt;" in page  # the garbage sample, escaped
    assert 'contenteditable="true">Sin incidentes mayores &lt;b&gt;' in page
    assert "firma no confiable" in page


def test_pdf_first_page_rendered_to_png(made: Path) -> None:
    pdf = made / "memoria-tecnica.pdf"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    ARTIFACTS.mkdir(exist_ok=True)
    prefix = ARTIFACTS / "report-page1"
    subprocess.run(
        ["pdftoppm", "-png", "-r", "80", "-l", "1", "-singlefile", str(pdf), str(prefix)],
        check=True,
    )
    png = prefix.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = subprocess.run(["pdftotext", "-l", "1", str(pdf), "-"], capture_output=True, text=True)
    assert "Memoria técnica del difusor del PREP" in text.stdout


def test_archive_holds_the_operation_days_raw_logs(made: Path, tmp_path: Path) -> None:
    with tarfile.open(made / "bitacoras.tar") as tar:
        assert sorted(tar.getnames()) == ["bitacoras/SHA256SUMS", "bitacoras/access.log.1.gz"]
        tar.extractall(tmp_path, filter="data") if hasattr(tarfile, "data_filter") else (
            tar.extractall(tmp_path)
        )
    folder = tmp_path / "bitacoras"
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=folder).returncode == 0


@pytest.mark.core
def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    base = ["--from", "2021-06-06T00:00:00-05:00", "--to", "2021-06-08T00:00:00-05:00"]
    base += ["--baseline-from", "2021-06-01T00:00:00-05:00"]
    base += ["--baseline-to", "2021-06-06T00:00:00-05:00", "--out", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="access log not found"):
        run_cli(["--access-log", str(tmp_path / "nope.log"), *base])
    log = tmp_path / "a.log"
    log.write_text("")
    bad = [*base]
    bad[1] = "2021-06-06T00:00:00"
    with pytest.raises(ConfigError, match="no UTC offset"):
        run_cli(["--access-log", str(log), *bad])
    assert run_cli(["--access-log", str(log), *base]) == 0  # an empty log is a report


@pytest.mark.core
def test_progress_display_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "a.log"
    rk.generate(log, 2000, seed=1)
    argv = ["--access-log", str(log), "--from", "2021-06-06T00:00:00-05:00"]
    argv += ["--to", "2021-06-08T00:00:00-05:00", "--baseline-from", "2021-06-04T00:00:00-05:00"]
    argv += ["--baseline-to", "2021-06-06T00:00:00-05:00", "--out", str(tmp_path / "o")]
    assert run_cli([*argv, "--progress"]) == 0
    err = capsys.readouterr().err
    assert "reading logs: 100.0%" in err and "2,000 lines" in err


def test_chromium_is_installed() -> None:
    assert shutil.which("chromium") and shutil.which("pdftoppm") and Path(rk.GOACCESS).exists()


@pytest.mark.core
def test_a_lost_watch_and_a_recovery_are_incidents() -> None:
    s = rk.ELECTION_START
    events = [
        {"time": (s + timedelta(minutes=m)).astimezone(UTC).isoformat(), "event": name}
        for m, name in (
            (1, "watcher-lost"),
            (2, "watcher-rearmed"),
            (3, "cut-seen"),
            (4, "agent-recovered"),
        )
    ]
    inc = read_incidents(events, OP)
    assert [o["event"] for o in inc.other] == ["watcher-lost", "watcher-rearmed", "agent-recovered"]
