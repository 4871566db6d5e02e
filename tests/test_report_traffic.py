"""Counting access logs: GoAccess cross-check and every input oddity of issue 6."""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

import pytest

from prep_agent.report.accesslog import parse_line_slow, parse_time
from prep_agent.report.summary import Options, daily
from prep_agent.report.traffic import (
    BASELINE,
    OPERATION,
    VISITS,
    Traffic,
    Windows,
    count_traffic,
    is_bot,
    page_key,
)
from tests import reportkit as rk

BASE_FROM = datetime(2021, 6, 4, tzinfo=rk.OFFSET)
SPLIT = datetime(2021, 6, 6, tzinfo=rk.OFFSET)
OP_TO = datetime(2021, 6, 9, tzinfo=rk.OFFSET)
WINDOWS = Windows(
    (int(BASE_FROM.timestamp()), int(SPLIT.timestamp())),
    (int(SPLIT.timestamp()), int(OP_TO.timestamp())),
    -5 * 3600,
)
OPTIONS = Options(baseline=(BASE_FROM, SPLIT), operation=(SPLIT, OP_TO))


def per_day(traffic: Traffic) -> dict[str, tuple[int, int]]:
    """Our per-day (hits, unique visitors) with bots included: GoAccess's figures."""
    out = {}
    for w in (BASELINE, OPERATION):
        for d in daily(traffic, w):
            out[d["date"]] = (d["all"]["hits"], d["all"]["unique_visitors"])
    return out


def figures(traffic: Traffic) -> list[dict[str, object]]:
    return daily(traffic, BASELINE) + daily(traffic, OPERATION)


@pytest.fixture(scope="module")
def plain_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logs") / "access.log"
    assert rk.generate(path, 40_000, seed=7) == 40_000
    return path


@pytest.mark.parametrize(
    ("variant", "log_format"),
    [("combined", "COMBINED"), ("vhost", "VCOMBINED"), ("rt", "COMBINED")],
)
def test_per_day_hits_and_unique_visitors_equal_goaccess(
    tmp_path: Path, variant: str, log_format: str
) -> None:
    path = tmp_path / "access.log"
    rk.generate(path, 25_000, seed=11, variant=variant)
    ours = per_day(count_traffic([path], WINDOWS, workers=1))
    theirs = rk.goaccess_days([path], log_format)
    assert len(theirs) == 4
    assert ours == theirs


def test_goaccess_agrees_on_4xx_and_odd_requests(tmp_path: Path) -> None:
    # 4xx-only visitors are hits but not unique visitors; a TLS handshake on port 80
    # and "-" requests are hits (GoAccess counts them), a bad IP is garbage for both.
    lines = [
        '10.0.0.1 - - [06/Jun/2021:10:00:00 -0500] "GET /x HTTP/1.1" 404 10 "-" "A"',
        '10.0.0.2 - - [06/Jun/2021:10:00:01 -0500] "GET / HTTP/1.1" 200 10 "-" "A"',
        '10.0.0.2 - - [06/Jun/2021:10:00:02 -0500] "GET /y HTTP/1.1" 404 10 "-" "A"',
        '10.0.0.3 - - [06/Jun/2021:10:00:03 -0500] "-" 400 0 "-" "-"',
        '10.0.0.4 - - [06/Jun/2021:10:00:04 -0500] "\\x16\\x03\\x01" 400 157 "-" "-"',
        '10.0.0.5 - - [06/Jun/2021:23:59:59 -0500] "HEAD / HTTP/1.0" 200 - "-" "B"',
        'not-an-ip - - [06/Jun/2021:10:00:05 -0500] "GET / HTTP/1.1" 200 10 "-" "A"',
        '10.0.0.6 - - [07/Jun/2021:00:00:00 -0500] "GET / HTTP/1.1" 503 10 "-" "B"',
    ]
    path = tmp_path / "odd.log"
    path.write_text("\n".join(lines) + "\n")
    traffic = count_traffic([path], WINDOWS, workers=1)
    assert traffic.garbage == 1
    assert (
        per_day(traffic)
        == rk.goaccess_days([path])
        == {
            "2021-06-06": (6, 2),
            "2021-06-07": (1, 1),
        }
    )


@pytest.mark.core
def test_gz_rotated_shuffled_and_garbage_give_the_same_figures(
    tmp_path: Path, plain_log: Path
) -> None:
    reference = count_traffic([plain_log], WINDOWS, workers=1)
    lines = plain_log.read_bytes().splitlines(keepends=True)
    # A rotated set: access.log.2.gz (oldest), access.log.1, access.log (newest).
    thirds = [lines[:13_000], lines[13_000:27_000], lines[27_000:]]
    rot2, rot1 = tmp_path / "access.log.2.gz", tmp_path / "access.log.1"
    cur = tmp_path / "access.log"
    raw2 = tmp_path / "raw2"
    raw2.write_bytes(b"".join(thirds[0]))
    rk.gzip_file(raw2, rot2)
    rot1.write_bytes(b"".join(thirds[1]))
    garbage = [
        b"\x00\xff binary junk\n",
        b"\n",
        b'10.0.0.9 - - [31/Jun/2021:10:00:00 -0500] "GET / HTTP/1.1" 200 1 "-" "A"\n',
        b'10.0.0.9 - - [06/Jun/2021:10:00 -0500] "GET / HTTP/1.1" 200 1 "-" "A"\n',
        b"truncated line 10.0.0.9 - - [06/Jun/2021:10:00:00 -05\n",
    ]
    cur.write_bytes(b"".join(thirds[2][:500]) + b"".join(garbage) + b"".join(thirds[2][500:]))
    # Given newest first, out of order: the reader orders the set by first time.
    traffic = count_traffic([cur, rot1, rot2], WINDOWS, workers=2, chunk_bytes=200_000)
    assert traffic.garbage == 4
    assert traffic.lines == 40_000 + 4  # the empty line is not a line
    assert [s[1] for s in traffic.samples] == [501, 503, 504, 505]
    assert {s[0] for s in traffic.samples} == {str(cur)}
    assert figures(traffic) == figures(reference)


@pytest.mark.core
def test_chunking_and_workers_do_not_change_the_figures(plain_log: Path) -> None:
    one = count_traffic([plain_log], WINDOWS, workers=1)
    many = count_traffic([plain_log], WINDOWS, workers=2, chunk_bytes=64_000)
    assert figures(one) == figures(many)
    assert one.pages == many.pages and one.status == many.status


@pytest.mark.core
def test_lines_out_of_order_within_a_file(tmp_path: Path, plain_log: Path) -> None:
    # nginx logs a request when it ends: lines may be seconds out of order.
    rnd = random.Random(3)
    lines = plain_log.read_bytes().splitlines(keepends=True)
    for _ in range(3000):
        i = rnd.randrange(len(lines) - 3)
        lines[i], lines[i + 2] = lines[i + 2], lines[i]
    shuffled = tmp_path / "shuffled.log"
    shuffled.write_bytes(b"".join(lines))
    assert figures(count_traffic([shuffled], WINDOWS, workers=1)) == figures(
        count_traffic([plain_log], WINDOWS, workers=1)
    )


def _line(ip: str, when: str, path: str = "/", status: int = 200, agent: str = "Firefox") -> str:
    return f'{ip} - - [{when} -0500] "GET {path} HTTP/1.1" {status} 100 "-" "{agent}"\n'


@pytest.mark.core
def test_visit_rule_30_minutes_across_chunks(tmp_path: Path) -> None:
    lines = [
        _line("10.1.1.1", "06/Jun/2021:10:00:00"),
        _line("10.1.1.1", "06/Jun/2021:10:29:59", "/static/frame.css"),  # same visit
        _line("10.1.1.1", "06/Jun/2021:11:00:00"),  # gap 30:01 -> new visit
        _line("10.1.1.1", "06/Jun/2021:11:00:00", agent="Chrome"),  # other UA: other visitor
        _line("10.1.1.2", "06/Jun/2021:11:10:00", "/status.json"),
        _line("10.1.1.2", "06/Jun/2021:11:40:00", "/status.json"),  # exactly 30:00 -> same
        _line("10.1.1.3", "06/Jun/2021:11:50:00", agent="Googlebot/2.1"),  # a bot, apart
    ]
    path = tmp_path / "visits.log"
    path.write_text("".join(lines))
    for chunk in (10**6, 80):  # 80 bytes: every line in its own chunk
        traffic = count_traffic([path], WINDOWS, workers=2, chunk_bytes=chunk)
        (day,) = daily(traffic, OPERATION)
        assert (day["visits"], day["hits"], day["pages"]) == (4, 6, 3)
        assert day["unique_visitors"] == 3
        assert (day["bots"]["visits"], day["bots"]["hits"], day["bots"]["pages"]) == (1, 1, 1)
        hours = {h: acc[VISITS] for (w, h, b), acc in traffic.hourly.items() if not b}
        assert sorted(hours.values()) == [1, 3]


@pytest.mark.core
def test_windows_and_days_use_the_report_offset(tmp_path: Path) -> None:
    # 04:30 UTC on the 7th is 23:30 on the 6th in UTC-5: the line belongs to the 6th.
    path = tmp_path / "utc.log"
    path.write_text(
        _line("10.2.2.2", "07/Jun/2021:04:30:00").replace("-0500", "+0000")
        + _line("10.2.2.2", "05/Jun/2021:23:59:59")  # baseline, last second
        + _line("10.2.2.2", "01/Jun/2021:12:00:00")  # outside both windows
    )
    traffic = count_traffic([path], WINDOWS, workers=1)
    assert [d["date"] for d in daily(traffic, OPERATION)] == ["2021-06-06"]
    assert [d["date"] for d in daily(traffic, BASELINE)] == ["2021-06-05"]
    assert traffic.outside == 1


@pytest.mark.core
def test_apache_escaped_quotes_and_common_format() -> None:
    req = parse_line_slow(
        b'10.0.0.1 - bob [06/Jun/2021:10:00:00 -0500] "GET /a?q=\\"x\\" HTTP/1.1" 200 5 '
        b'"-" "Agent \\"quoted\\""'
    )
    assert req is not None and req.path == b'/a?q=\\"x\\"' and req.agent == b'Agent \\"quoted\\"'
    common = parse_line_slow(b'::1 - - [06/Jun/2021:10:00:00 +0000] "GET / HTTP/1.1" 304 -')
    assert common is not None and common.size == 0 and common.agent == b"-"
    assert parse_time(b"06/Jun/2021:10:00:00 -0500") == int(
        datetime(2021, 6, 6, 15, tzinfo=rk.timezone.utc).timestamp()
    )
    assert parse_time(b"29/Feb/2021:10:00:00 -0500") is None


@pytest.mark.parametrize(
    ("path", "page"),
    [
        (b"/", b"/"),
        (b"/?embed=1", b"/"),
        (b"/cortes/000001-ab/index.html", b"/cortes/000001-ab/index.html"),
        (b"/resultados/", b"/resultados/"),
        (b"/presidencias", b"/presidencias"),
        (b"/status.json", None),
        (b"/static/frame.js", None),
        (b"/cortes/000001-ab/datos/a.csv", None),
        (b"/health", None),
        (b"/favicon.ico", None),
    ],
)
@pytest.mark.core
def test_page_definition(path: bytes, page: bytes | None) -> None:
    assert page_key(path) == page


@pytest.mark.core
def test_known_bots() -> None:
    assert is_bot(b"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)")
    assert is_bot(b"curl/7.74.0") and is_bot(b"-")
    assert not is_bot(b"Mozilla/5.0 (iPhone; CPU iPhone OS 14_6 like Mac OS X) Safari/604.1")
