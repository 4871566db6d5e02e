"""Realistic, seeded access logs of a prep-agent site, for the report's tests and benchmark.

The traffic model follows the frame's layout: a visit loads ``/`` (the frame),
its CSS and JS, ``/status.json`` and the cut's ``/cortes/<release>/index.html``
with a few data files, then every open page polls ``/status.json`` every 15 s
and loads the new cut's page when the release changes (every 10 min). Bots
crawl documents; a few requests fail (404, 5xx); some answers are 304. Sessions
arrive following a day curve with the election-night peak. Lines are written
in time order (a calendar queue keyed by second), so generation is linear.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any

OFFSET = timezone(timedelta(hours=-5))
"""Coahuila's UTC offset in June 2021 (the logs are written in it)."""

START = datetime(2021, 6, 4, tzinfo=OFFSET)
"""Start of the generated span: two baseline days, then election day and the next."""

ELECTION_START = datetime(2021, 6, 6, 20, 0, tzinfo=OFFSET)
"""The PREP opens."""

ELECTION_END = datetime(2021, 6, 7, 20, 0, tzinfo=OFFSET)
"""The PREP closes."""

GOACCESS = "/usr/bin/goaccess"
"""The Debian package's binary."""

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

BROWSERS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/{v}.0.4472.77 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 14_{v} like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/14.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 11; SM-A{v}5F) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/91.0.4472.{v} Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_{v}) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/14.1 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:{v}.0) Gecko/20100101 Firefox/{v}.0",
)
BOTS = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    "Twitterbot/1.0",
    "curl/7.74.0",
    "python-requests/2.25.1",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
)
REFERERS = ("-", "https://www.google.com/", "https://t.co/abc", "https://www.facebook.com/", "-")


def stamp(t: int) -> str:
    """``06/Jun/2021:20:15:01 -0500`` of epoch seconds, in OFFSET."""
    d = datetime.fromtimestamp(t, OFFSET)
    return f"{d.day:02d}/{MONTHS[d.month - 1]}/{d.year}:{d:%H:%M:%S} -0500"


_OPEN = int(ELECTION_START.timestamp())
_CLOSE = int(ELECTION_END.timestamp())


def weight(t: int) -> float:
    """Relative arrival rate of new visits at epoch ``t`` (the election-night curve)."""
    hour = (t - 5 * 3600) % 86400 / 3600
    daily = 0.3 + 0.7 * max(0.0, 1 - abs(hour - 14) / 10)
    if _OPEN <= t < _CLOSE:
        since = (t - _OPEN) / 3600
        return daily + 12 * max(0.15, 1 - abs(since - 3) / 8)
    return daily


class Writer:
    """Buffers lines and writes them to a text stream in blocks."""

    def __init__(self, out: IO[str], limit: int) -> None:
        self.out, self.limit, self.count, self.buf = out, limit, 0, []  # type: ignore[var-annotated]

    def emit(self, line: str) -> bool:
        self.buf.append(line)
        self.count += 1
        if len(self.buf) >= 65536:
            self.flush()
        return self.count >= self.limit

    def flush(self) -> None:
        self.out.write("".join(self.buf))
        self.buf = []


def generate(
    path: Path,
    lines: int,
    seed: int = 2021,
    start: datetime = START,
    days: float = 4.0,
    variant: str = "combined",
    gz: bool = False,
) -> int:
    """Write ``lines`` log lines (fewer if the span ends) to ``path``; return the count.

    ``variant``: ``combined``; ``vhost`` (``prep.example.mx:443 `` prefix);
    ``rt`` (nginx `` 0.004`` request-time suffix).
    """
    rnd = random.Random(seed)
    t0 = int(start.timestamp())
    t_end = t0 + int(days * 86400)
    n_ips = max(50, min(4000, lines // 400))
    ips = [
        f"{rnd.choice((187, 189, 201, 200, 177))}.{rnd.randrange(256)}."
        f"{rnd.randrange(256)}.{rnd.randrange(1, 255)}"
        for _ in range(n_ips)
    ]
    agents = [rnd.choice(BROWSERS).format(v=rnd.randrange(10, 99)) for _ in range(300)]
    visitors = []
    for ip in ips:
        for _ in range(rnd.choice((1, 1, 1, 2))):
            visitors.append((ip, rnd.choice(agents)))
    bots = [(f"66.249.{rnd.randrange(64, 80)}.{rnd.randrange(1, 255)}", b) for b in BOTS]
    # Sessions: expected lines per session ~ 8 + duration / 15 s.
    mean_duration = 1200
    per_session = 8 + mean_duration / 15
    total_weight = sum(weight(t) for t in range(t0, t_end, 60)) * 60
    rate = lines / per_session / total_weight * 1.05
    queue: dict[int, list[list[Any]]] = {}
    prefix = "prep.example.mx:443 " if variant == "vhost" else ""
    suffix = " 0.004\n" if variant == "rt" else "\n"
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as out:  # type: ignore[operator]
        w = Writer(out, lines)
        done = False
        t = t0
        carry = 0.0
        while t < t_end and not done:
            carry += rate * weight(t)
            arrivals = int(carry)
            carry -= arrivals
            if not arrivals and t not in queue:
                t += 1
                continue
            ts = stamp(t)
            release = f"{(t - t0) // 600:06d}-{(t - t0) // 600 * 7919 % 65536:04x}"
            for _ in range(arrivals):
                bot = rnd.random() < 0.04
                ip, ua = rnd.choice(bots) if bot else rnd.choice(visitors)
                ref = rnd.choice(REFERERS)
                head = f'{prefix}{ip} - - [{ts}] "GET '
                if bot:
                    page = rnd.choice(("/", "/cortes/" + release + "/index.html", "/robots.txt"))
                    status = "404" if page == "/robots.txt" else "200"
                    done = w.emit(f'{head}{page} HTTP/1.1" {status} 5120 "{ref}" "{ua}"{suffix}')
                    continue
                first = [
                    ("/", "200", 2345),
                    ("/static/frame.css", "200", 1800),
                    ("/static/frame.js", "200", 5400),
                    ("/status.json", "200", 410),
                    (f"/cortes/{release}/index.html", "200", 48000),
                    (f"/cortes/{release}/datos/resumen.json", "200", 12000),
                ]
                if rnd.random() < 0.1:
                    first[1] = ("/static/frame.css", "304", 0)
                if rnd.random() < 0.02:
                    first.append(("/favicon.ico", "404", 153))
                for p, s, b in first:
                    if rnd.random() < 0.002:
                        s = "502"
                    line = f'{head}{p} HTTP/1.1" {s} {b} "{ref}" "{ua}"{suffix}'
                    done = w.emit(line)
                    if done:
                        break
                if done:
                    break
                polls = int(rnd.expovariate(1 / mean_duration) / 15)
                if polls:
                    queue.setdefault(t + 15, []).append([ip, ua, polls, release])
            for visit in queue.pop(t, ()) if not done else ():
                ip, ua, polls, rel = visit
                head = f'{prefix}{ip} - - [{ts}] "GET '
                if rel != release:
                    visit[3] = release
                    done = w.emit(
                        f'{head}/cortes/{release}/index.html HTTP/1.1" 200 48000 "-" "{ua}"{suffix}'
                    )
                    if done:
                        break
                code = "200" if rnd.random() < 0.7 else "304"
                done = w.emit(f'{head}/status.json HTTP/1.1" {code} 410 "-" "{ua}"{suffix}')
                if done:
                    break
                if polls > 1:
                    visit[2] = polls - 1
                    queue.setdefault(t + 15, []).append(visit)
            t += 1
        w.flush()
        return w.count


def goaccess_days(logs: list[Path], log_format: str = "COMBINED") -> dict[str, tuple[int, int]]:
    """GoAccess's per-day ``(hits, unique visitors)`` for the logs, keyed ``YYYY-MM-DD``."""
    proc = subprocess.run(
        [
            GOACCESS,
            f"--log-format={log_format}",
            "--no-global-config",
            "-o",
            "json",
            *[str(p) for p in logs],
        ],
        capture_output=True,
        check=True,
    )
    doc = json.loads(proc.stdout)
    days = {}
    for item in doc["visitors"]["data"]:
        d = item["data"]
        days[f"{d[0:4]}-{d[4:6]}-{d[6:8]}"] = (item["hits"]["count"], item["visitors"]["count"])
    return days


def gzip_file(src: Path, dst: Path) -> None:
    """Compress ``src`` into ``dst``."""
    with open(src, "rb") as fin, gzip.open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def write_journal(path: Path, events: list[dict[str, Any]]) -> None:
    """Write journal events (``time`` as datetime or text) as JSON lines."""
    with open(path, "w", encoding="utf-8") as fh:
        for e in events:
            rec = dict(e)
            if isinstance(rec["time"], datetime):
                utc = rec["time"].astimezone(timezone.utc)
                rec["time"] = utc.isoformat(timespec="milliseconds")
            fh.write(json.dumps(rec) + "\n")
