"""Reading web server access logs: combined format and its common variants.

Accepted lines (nginx and Apache): the Combined Log Format
``IP - user [06/Jun/2021:20:15:01 -0500] "GET / HTTP/1.1" 200 512 "ref" "agent"``,
with an optional virtual-host prefix (``example.org:443 IP ...``, Apache's
``vhost_combined``), any suffix after the user agent (request time, upstream
time, forwarded-for) and the Common Log Format (no referer or agent). Files
may be plain or gzip-compressed. A line that does not parse, or whose client
address is not an IP address, is *garbage*: counted and sampled, never fatal.

Parsing works on bytes; the fast path is one ``split(b'"')`` per line, the
regular expression only runs for lines the fast path does not recognise.
"""

from __future__ import annotations

import calendar
import gzip
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MONTHS = {
    m.encode(): i
    for i, m in enumerate(
        ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1
    )
}
"""English month abbreviations of the log time stamp (``%b``)."""

GZIP_MAGIC = b"\x1f\x8b"
"""The first two bytes of a gzip file: compressed input is recognised by content."""

_SLOW_LINE = re.compile(
    rb"^(?:(?P<vhost>\S+) )?(?P<ip>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "
    rb'"(?P<request>(?:[^"\\]|\\.)*)" (?P<status>\d{3}) (?P<size>\d+|-)'
    rb'(?: "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)")?'
)


@dataclass(frozen=True)
class Request:
    """One parsed access-log line (the fields the report uses)."""

    ip: bytes
    time: bytes
    method: bytes
    path: bytes
    status: bytes
    size: int
    agent: bytes


def parse_time(text: bytes) -> int | None:
    """Seconds since the epoch of ``06/Jun/2021:20:15:01 -0500``, or None if invalid."""
    try:
        day, month, year = int(text[0:2]), MONTHS[text[3:6]], int(text[7:11])
        hour, minute, second = int(text[12:14]), int(text[15:17]), int(text[18:20])
        sign, off_h, off_m = text[21:22], int(text[22:24]), int(text[24:26])
    except (KeyError, ValueError):
        return None
    if (
        len(text) != 26
        or text[2:3] != b"/"
        or text[11:12] != b":"
        or sign not in (b"+", b"-")
        or not (1 <= day <= calendar.monthrange(year, month)[1])
        or hour > 23
        or minute > 59
        or second > 60
    ):
        return None
    offset = (off_h * 3600 + off_m * 60) * (1 if sign == b"+" else -1)
    return calendar.timegm((year, month, day, hour, minute, second)) - offset


def is_ip(text: bytes) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 address (GoAccess rejects other clients)."""
    try:
        ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def split_request(request: bytes) -> tuple[bytes, bytes]:
    """``(method, path)`` of ``GET /path HTTP/1.1``; an odd request is its own path."""
    fields = request.split(b" ")
    if len(fields) == 3:
        return fields[0], fields[1]
    if len(fields) == 2:
        return fields[0], fields[1]
    return b"-", request


def parse_line_slow(line: bytes) -> Request | None:
    """Parse any accepted variant with the regular expression; None for garbage."""
    m = _SLOW_LINE.match(line.strip())
    if m is None:
        return None
    ip = m.group("ip")
    if not is_ip(ip):
        return None
    time = m.group("time")
    if parse_time(time) is None:
        return None
    method, path = split_request(m.group("request"))
    size = m.group("size")
    agent = m.group("agent")
    return Request(
        ip=ip,
        time=time,
        method=method,
        path=path,
        status=m.group("status"),
        size=0 if size == b"-" else int(size),
        agent=agent if agent is not None else b"-",
    )


def open_log(path: Path) -> BinaryIO:
    """Open a plain or gzip-compressed log for binary reading (sniffed by content)."""
    if is_gzip(path):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def is_gzip(path: Path) -> bool:
    """Whether the file is gzip-compressed (by its first bytes)."""
    with open(path, "rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def first_time(path: Path, max_lines: int = 1000) -> int | None:
    """Epoch seconds of the first parseable line in the first ``max_lines`` lines."""
    with open_log(path) as fh:
        for _, line in zip(range(max_lines), fh):
            request = parse_line_slow(line)
            if request is not None:
                return parse_time(request.time)
    return None


def chunk_ranges(path: Path, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of a plain file, cut just after a newline.

    The cuts depend only on the file and ``chunk_bytes``, never on the number of
    workers, so the report is the same however many processes read it.
    """
    size = path.stat().st_size
    start = 0
    with open(path, "rb") as fh:
        while start < size:
            end = start + chunk_bytes
            if end >= size:
                yield start, size
                return
            fh.seek(end)
            fh.readline()
            end = fh.tell()
            yield start, end
            start = end
