"""The memoria técnica's charts: SVG drawn by the report itself, no plotting library.

The charts are parsed as XML and measured: bars stand where their hour or day is,
their heights follow the axis, every bar names its exact figures, labels do not
overlap, and an empty window still gives a chart that says so.
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from prep_agent.report.charts import daily_chart, hourly_chart, nice_ticks, number

pytestmark = pytest.mark.core

SVG = "{http://www.w3.org/2000/svg}"
TZ = timezone(timedelta(hours=-6))
ROOT = Path(__file__).resolve().parents[1]


def hours(count: int, skip: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    start = datetime(2021, 6, 6, 18, tzinfo=TZ)
    return [
        {
            "hour": (start + timedelta(hours=i)).isoformat(),
            "hits": 1000 + 250 * i,
            "bot_hits": 40 + i,
            "visits": 30 + 3 * i,
            "pages": 90 + 7 * i,
            "errors_5xx": 2 if i == 1 else 0,
        }
        for i in range(count)
        if i not in skip
    ]


def parse(svg: str) -> ET.Element:
    assert svg.startswith("<svg ") and svg.count("<svg") == 1
    return ET.fromstring(svg)


def bar_groups(root: ET.Element) -> list[ET.Element]:
    return [g for g in root.iter(f"{SVG}g") if g.find(f"{SVG}title") is not None]


def texts(root: ET.Element) -> list[ET.Element]:
    return list(root.iter(f"{SVG}text"))


def test_nice_ticks_cover_the_data_in_round_steps() -> None:
    assert nice_ticks(0) == [0, 1]
    assert nice_ticks(3) == [0, 1, 2, 3]
    assert nice_ticks(974) == [0, 200, 400, 600, 800, 1000]
    assert nice_ticks(101_602) == [0, 25_000, 50_000, 75_000, 100_000, 125_000]
    for top in (1, 7, 13, 99, 101, 4515, 123_456, 9_999_999):
        ticks = nice_ticks(top)
        assert ticks[0] == 0 and ticks[-1] >= top and 2 <= len(ticks) <= 7, (top, ticks)
        steps = {b - a for a, b in zip(ticks, ticks[1:])}
        assert len(steps) == 1 and re.fullmatch(r"(1|2|25|5)0*", str(steps.pop())), ticks
    assert number(1234567) == "1\u202f234\u202f567"


def test_hourly_bars_follow_the_data_and_name_their_figures() -> None:
    data = hours(12, skip=(5,))
    root = parse(hourly_chart(data, "Operación del PREP, por hora"))
    assert root.find(f"{SVG}title").text == "Operación del PREP, por hora"  # type: ignore[union-attr]
    groups = bar_groups(root)
    assert len(groups) == 12  # one per hour of the span, the quiet hour included
    tips = [g.find(f"{SVG}title").text or "" for g in groups]  # type: ignore[union-attr]
    assert tips[0] == (
        "06/06/2021 18:00 h: 1\u202f000 hits de personas, 40 de robots; 30 visitas, 90 páginas"
    )
    assert tips[1].endswith("; 2 errores 5xx")
    assert tips[5].startswith("06/06/2021 23:00 h: 0 hits de personas")
    people = [g.findall(f"{SVG}rect")[0] for g in groups if g.findall(f"{SVG}rect")]
    assert len(people) == 11
    heights = [float(r.get("height", "0")) for r in people]
    values = [h["hits"] for h in data]
    # Heights are proportional to the hits (one scale for every bar).
    scale = heights[-1] / values[-1]
    assert all(abs(h - v * scale) < 0.2 for h, v in zip(heights, values))
    xs = [float(r.get("x", "0")) for r in people]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)
    # The left axis reaches the highest stack; its labels are the nice ticks.
    labels = [t.text for t in texts(root)]
    top = max(h["hits"] + h["bot_hits"] for h in data)
    assert number(nice_ticks(top)[-1]) in labels
    # Visits and pages: one point per hour, the quiet hour at zero.
    lines = list(root.iter(f"{SVG}polyline"))
    assert len(lines) == 2 and all(len(p.get("points", "").split()) == 12 for p in lines)
    assert "Horas con errores 5xx" in labels and "Hits (robots)" in labels


def test_hourly_labels_never_overlap_on_a_long_window() -> None:
    root = parse(hourly_chart(hours(24 * 9), "Referencia, por hora"))
    dates = [t for t in texts(root) if re.fullmatch(r"\d\d/\d\d", t.text or "")]
    xs = [float(t.get("x", "0")) for t in dates]
    assert len(xs) >= 5
    assert min(b - a for a, b in zip(xs, xs[1:])) >= 48
    times = {t.text for t in texts(root) if re.fullmatch(r"\d\d:\d\d", t.text or "")}
    assert times <= {"00:00", "12:00"}, times  # aligned on the local day


def test_daily_bars_for_both_windows_with_their_values() -> None:
    days = {
        "baseline": [
            {"date": "2021-06-04", "visits": 201, "pages": 841, "hits": 18601},
            {"date": "2021-06-05", "visits": 200, "pages": 788, "hits": 17089},
        ],
        "operation": [
            {"date": "2021-06-06", "visits": 671, "pages": 2937, "hits": 61859},
            {"date": "2021-06-07", "visits": 974, "pages": 4515, "hits": 101602},
        ],
    }
    root = parse(daily_chart(days))
    groups = bar_groups(root)
    assert len(groups) == 12  # 4 days x 3 figures
    tips = [g.find(f"{SVG}title").text for g in groups]  # type: ignore[union-attr]
    assert "Referencia (habitual), 04/06/2021: 201 visitas" in tips
    assert "Operación del PREP, 07/06/2021: 101\u202f602 hits" in tips
    colours = [g.find(f"{SVG}rect").get("fill") for g in groups]  # type: ignore[union-attr]
    assert colours[:4] == ["#8c8c8c", "#8c8c8c", "#1f5fa8", "#1f5fa8"]
    labels = [t.text for t in texts(root)]
    for value in ("974", "4\u202f515", "101\u202f602", "17\u202f089"):
        assert value in labels, value
    assert {"Visitas por día", "Páginas por día", "Hits por día"} <= set(labels)


def test_daily_labels_turn_when_days_are_many() -> None:
    start = datetime(2021, 5, 1)
    many = [
        {"date": (start + timedelta(days=i)).date().isoformat(), "visits": i, "pages": i, "hits": i}
        for i in range(20)
    ]
    root = parse(daily_chart({"baseline": many, "operation": many[:10]}))
    dates = [t for t in texts(root) if re.fullmatch(r"\d\d/\d\d", t.text or "")]
    assert len(dates) == 90 and all("rotate(-45" in t.get("transform", "") for t in dates)


def test_empty_windows_still_draw_a_chart() -> None:
    root = parse(hourly_chart([], "Referencia, por hora"))
    assert "Sin tráfico en este periodo" in [t.text for t in texts(root)]
    root = parse(daily_chart({"baseline": [], "operation": []}))
    assert [t.text for t in texts(root)].count("Sin tráfico") == 3


def test_the_report_needs_no_plotting_library(tmp_path: Path) -> None:
    """A whole report in a fresh interpreter loads no matplotlib (nor numpy)."""
    log = tmp_path / "access.log"
    log.write_text(
        '10.0.0.1 - - [06/Jun/2021:21:00:00 -0500] "GET / HTTP/1.1" 200 10 "-" "Mozilla/5.0"\n'
    )
    code = (
        "import sys\n"
        "from prep_agent.cli.main import main\n"
        "argv = ['report', '--access-log', sys.argv[1], '--out', sys.argv[2], '--no-progress',"
        " '--from', '2021-06-06T00:00:00-05:00', '--to', '2021-06-08T00:00:00-05:00',"
        " '--baseline-from', '2021-06-04T00:00:00-05:00',"
        " '--baseline-to', '2021-06-06T00:00:00-05:00']\n"
        "assert main(argv) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'numpy')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(log), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "memoria-tecnica.html").read_text().count("<svg") == 3
