"""Counting hits, pages, visits and unique visitors in access logs.

Definitions (stated in the report as well):

- *hit*: any request (valid line) in the window.
- *page*: a successful (2xx or 304) GET/HEAD request for a document: ``/``, a
  path ending in ``/``, ``.html`` or ``.htm``, or without an extension; not
  assets (``/static/…``, images, scripts, ``status.json``) nor the agent's
  endpoints (``/health``, ``/metrics``…).
- *visit*: the requests of one IP + user agent with gaps under 30 minutes
  (AWStats, Matomo); a visit counts in the hour of its first request.
- *unique visitors per day*: distinct IP + user agent that day, not counting
  requests answered 4xx (GoAccess's default, ``--4xx-to-unique-count`` off).
- *known bots* (user agent names a crawler, a monitor or an HTTP library) are
  counted apart from people.
- days and hours are in the report's UTC offset (that of ``--from``).

Memory is bounded by the number of distinct visitors, never by lines: per
(IP, user agent) key only its hash and the time it was last seen, and per day a
set of key hashes. Plain files are cut into fixed-size chunks read by worker
processes; the visits split by a chunk boundary are stitched when the chunks
are merged in order, so the figures do not depend on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep_agent.report.accesslog import (
    chunk_ranges,
    first_time,
    is_gzip,
    is_ip,
    open_log,
    parse_line_slow,
    parse_time,
)

VISIT_GAP = 30 * 60
"""Seconds of inactivity that end a visit."""

CHUNK_BYTES = 32 * 1024 * 1024
"""Size of the chunks of a plain log read by one worker (bounds worker memory)."""

READ_BYTES = 8 * 1024 * 1024
"""Block size when reading a compressed log."""

BASELINE = 0
"""Window index of the portal's usual traffic."""
OPERATION = 1
"""Window index of the PREP operation (election night and the next day)."""
OUTSIDE = -1
"""Time stamp outside both windows."""
INVALID = -2
"""Time stamp that does not parse."""

HITS, PAGES, BYTES, VISITS, ERRORS = range(5)
"""Positions in an hourly counter list (ERRORS: responses 5xx)."""

BOT_MARKERS = (
    b"bot",
    b"crawl",
    b"spider",
    b"slurp",
    b"facebookexternalhit",
    b"mediapartners",
    b"curl/",
    b"wget/",
    b"python-requests",
    b"python-urllib",
    b"go-http-client",
    b"java/",
    b"libwww",
    b"httpclient",
    b"okhttp",
    b"headlesschrome",
    b"lighthouse",
    b"pingdom",
    b"uptimerobot",
    b"monitor",
    b"scrapy",
    b"ahrefs",
    b"semrush",
    b"yandex",
    b"feedfetcher",
    b"preview",
    b"prometheus",
    b"zabbix",
)
"""Case-insensitive user-agent fragments of known bots, monitors and HTTP libraries."""

NOT_PAGES = frozenset((b"/status.json", b"/health", b"/livez", b"/readyz", b"/metrics"))
"""Extensionless or JSON endpoints that are not documents."""

DOCUMENT_SUFFIXES = (b"/", b".html", b".htm")
"""Path endings of documents."""

SAMPLE_LIMIT = 20
"""Garbage lines kept as examples for the report."""


@dataclass(frozen=True)
class Windows:
    """The two report windows (epoch seconds, half-open) and the report's UTC offset."""

    baseline: tuple[int, int]
    operation: tuple[int, int]
    offset: int

    def classify(self, stamp: bytes, minutes: dict[bytes, int | None]) -> tuple[int, int, int, int]:
        """``(epoch, window, hour, day)`` of a log time stamp; window may be OUTSIDE or INVALID.

        ``minutes`` caches the epoch of each ``dd/Mon/yyyy:HH:MM`` + offset seen.
        """
        key = stamp[:17] + stamp[20:]
        base = minutes.get(key, -1)
        if base == -1:
            base = minutes[key] = parse_time(stamp[:18] + b"00" + stamp[20:])
        second = stamp[18:20]
        if base is None or len(stamp) != 26 or not second.isdigit() or second > b"59":
            t = parse_time(stamp)  # rare: a leap second or garbage
            if t is None:
                return (0, INVALID, 0, 0)
        else:
            t = base + int(second)
        if self.operation[0] <= t < self.operation[1]:
            window = OPERATION
        elif self.baseline[0] <= t < self.baseline[1]:
            window = BASELINE
        else:
            window = OUTSIDE
        local = t + self.offset
        return (t, window, local // 3600, local // 86400)


@dataclass(frozen=True)
class Task:
    """One unit of work: a whole file (compressed) or a byte range of a plain file."""

    order: int
    file_index: int
    path: Path
    start: int
    end: int | None


@dataclass
class ChunkStats:
    """What one task counted; merged in task order by ``Traffic.add``."""

    lines: int = 0
    physical: int = 0
    garbage: int = 0
    outside: int = 0
    samples: list[tuple[int, str]] = field(default_factory=list)
    hourly: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)
    uniques: dict[tuple[int, int, int], set[int]] = field(default_factory=dict)
    first: dict[int, tuple[int, int, int, int]] = field(default_factory=dict)
    last: dict[int, int] = field(default_factory=dict)
    status: tuple[dict[bytes, int], dict[bytes, int]] = field(default_factory=lambda: ({}, {}))
    pages: tuple[dict[bytes, int], dict[bytes, int]] = field(default_factory=lambda: ({}, {}))
    operation_lines: int = 0
    bytes_read: int = 0


def is_bot(agent: bytes) -> bool:
    """Whether a user agent is a known bot, monitor or HTTP library."""
    low = agent.lower()
    return agent in (b"", b"-") or any(m in low for m in BOT_MARKERS)


def page_key(path: bytes) -> bytes | None:
    """The document a request path names (query dropped), or None if it is not a page."""
    path = path.split(b"?", 1)[0].split(b"#", 1)[0]
    if not path.startswith(b"/") or path in NOT_PAGES or path.startswith(b"/static/"):
        return None
    if path.endswith(DOCUMENT_SUFFIXES):
        return path
    last = path.rsplit(b"/", 1)[-1]
    return None if b"." in last else path


def scan(blocks: Iterable[list[bytes]], windows: Windows, st: ChunkStats) -> None:
    """Count every line into ``st``: the hot loop, one pass over the task's lines.

    Per-task caches make repeated fields cheap: each second's time stamp maps to
    its epoch and to the counters of its hour and day; each (IP, user agent) to
    a visitor record ``[key hash, bot, last seen]``.
    """
    times: dict[bytes, tuple[Any, ...]] = {}
    minutes: dict[bytes, int | None] = {}
    bots: dict[bytes, int] = {}
    paths: dict[bytes, bytes | None] = {}
    visitors: dict[bytes, list[Any] | None] = {}
    first = st.first
    lineno = st.physical
    blank = garbage = outside = 0
    for lines in blocks:
        for line in lines:
            lineno += 1
            if not line:
                blank += 1
                continue
            parts = line.split(b'"')
            rec: Any = None
            if len(parts) == 7:
                head = parts[0]
                hs = head.split(b" ")
                n = len(hs)
                rs = parts[1].split(b" ")
                mid = parts[2]
                status, size = mid[1:4], mid[5:-1]
                if (
                    (n == 6 or n == 7)
                    and len(rs) == 3
                    and mid[4:5] == b" "
                    and status.isdigit()
                    and (size.isdigit() or size == b"-")
                    and mid[-1:] == b" "
                ):
                    vk = (hs[0] if n == 6 else hs[1]) + b'"' + parts[5]
                    rec = visitors.get(vk, False)
                    if rec is False:
                        rec = visitors[vk] = _new_visitor(
                            vk, hs[0] if n == 6 else hs[1], parts[5], bots
                        )
                    stamp = head[-28:-2]
                    method, path = rs[0], rs[1]
                    size_n = int(size) if size != b"-" else 0
            if rec is None:
                req = parse_line_slow(line)
                if req is None:
                    garbage += 1
                    if len(st.samples) < SAMPLE_LIMIT:
                        st.samples.append((lineno, line[:300].decode("utf-8", "replace")))
                    continue
                stamp, method, path = req.time, req.method, req.path
                status, size_n = req.status, req.size
                vk = req.ip + b'"' + req.agent
                rec = visitors.get(vk)
                if rec is None:
                    rec = visitors[vk] = _new_visitor(vk, req.ip, req.agent, bots)
                assert rec is not None
            tv = times.get(stamp)
            if tv is None:
                tv = times[stamp] = _second(windows, stamp, minutes, st)
            win = tv[1]
            if win < 0:
                if win == OUTSIDE:
                    outside += 1
                else:
                    garbage += 1
                    if len(st.samples) < SAMPLE_LIMIT:
                        st.samples.append((lineno, line[:300].decode("utf-8", "replace")))
                continue
            t = tv[0]
            key, bot, seen = rec
            acc = tv[2 + bot]
            acc[0] += 1
            acc[2] += size_n
            counts = tv[7]
            counts[status] = counts.get(status, 0) + 1
            code = status[0]
            if code != 52:  # b"4": GoAccess leaves 4xx out of unique visitors
                tv[4 + bot].add(key)
                if code == 53:  # b"5"
                    acc[4] += 1
            if (code == 50 or status == b"304") and (method == b"GET" or method == b"HEAD"):
                page = paths.get(path, b"")
                if page == b"":
                    if len(paths) > 100_000:
                        paths.clear()
                    page = paths[path] = page_key(path)
                if page is not None:
                    acc[1] += 1
                    pc = tv[8]
                    pc[page] = pc.get(page, 0) + 1
            if seen is None:
                acc[3] += 1
                first[key] = (t, win, tv[6], bot)
                rec[2] = t
            elif t - seen > VISIT_GAP:
                acc[3] += 1
                rec[2] = t
            elif t > seen:
                rec[2] = t
    st.lines += lineno - st.physical - blank
    st.physical = lineno
    st.garbage += garbage
    st.outside += outside
    for r in visitors.values():
        if r is not None and r[2] is not None:
            st.last[r[0]] = r[2]


def _new_visitor(vk: bytes, ip: bytes, agent: bytes, bots: dict[bytes, int]) -> list[Any] | None:
    """A visitor record ``[hash, bot, last seen]``, or None if ``ip`` is not an IP."""
    if not is_ip(ip):
        return None
    bot = bots.get(agent)
    if bot is None:
        bot = bots[agent] = int(is_bot(agent))
    return [hash(vk), bot, None]


def _second(
    windows: Windows, stamp: bytes, minutes: dict[bytes, int | None], st: ChunkStats
) -> tuple[Any, ...]:
    """``(epoch, window, hour counters people/bots, day key sets people/bots, hour,
    status counts, page counts)``: what every line of that second updates."""
    t, win, hour, day = windows.classify(stamp, minutes)
    if win < 0:
        return (t, win)
    accs = [st.hourly.setdefault((win, hour, bot), [0, 0, 0, 0, 0]) for bot in (0, 1)]
    sets = [st.uniques.setdefault((win, day, bot), set()) for bot in (0, 1)]
    return (t, win, accs[0], accs[1], sets[0], sets[1], hour, st.status[win], st.pages[win])


def read_blocks(task: Task) -> Iterator[list[bytes]]:
    """The task's lines, a block of lines at a time (bounded memory)."""
    if task.end is not None:
        with open(task.path, "rb") as fh:
            fh.seek(task.start)
            remaining = task.end - task.start
            carry = b""
            while remaining > 0:
                data = fh.read(min(READ_BYTES, remaining))
                if not data:
                    break
                remaining -= len(data)
                lines = (carry + data).split(b"\n")
                carry = lines.pop()
                yield lines
            if carry:
                yield [carry]
        return
    with open_log(task.path) as fh:
        carry = b""
        while True:
            data = fh.read(READ_BYTES)
            if not data:
                break
            lines = (carry + data).split(b"\n")
            carry = lines.pop()
            yield lines
        if carry:
            yield [carry]


def run_task(task: Task, windows: Windows) -> ChunkStats:
    """Count one task (runs in a worker process)."""
    st = ChunkStats()
    scan(read_blocks(task), windows, st)
    st.operation_lines = sum(a[HITS] for k, a in st.hourly.items() if k[0] == OPERATION)
    st.bytes_read = (task.end - task.start) if task.end is not None else task.path.stat().st_size
    return st


def plan_tasks(paths: list[Path], chunk_bytes: int = CHUNK_BYTES) -> list[Task]:
    """Tasks in reading order: files by the time of their first line, then by offset.

    Rotated sets (``access.log.2.gz``, ``access.log.1``, ``access.log``) are thus
    read oldest first whatever order they are given in.
    """
    keyed = []
    for i, p in enumerate(paths):
        t = first_time(p)
        keyed.append((t is None, t or 0, i, p))
    keyed.sort()
    tasks: list[Task] = []
    for _, _, i, p in keyed:
        if is_gzip(p):
            tasks.append(Task(len(tasks), i, p, 0, None))
        else:
            for start, end in chunk_ranges(p, chunk_bytes):
                tasks.append(Task(len(tasks), i, p, start, end))
    return tasks


@dataclass
class Traffic:
    """The merged counts of every task."""

    windows: Windows
    lines: int = 0
    garbage: int = 0
    outside: int = 0
    samples: list[tuple[str, int, str]] = field(default_factory=list)
    hourly: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)
    uniques: dict[tuple[int, int, int], set[int]] = field(default_factory=dict)
    status: tuple[dict[bytes, int], dict[bytes, int]] = field(default_factory=lambda: ({}, {}))
    pages: tuple[dict[bytes, int], dict[bytes, int]] = field(default_factory=lambda: ({}, {}))
    files_with_operation: set[int] = field(default_factory=set)
    last_seen: dict[int, int] = field(default_factory=dict)
    file_lines: dict[int, int] = field(default_factory=dict)

    def add(self, task: Task, st: ChunkStats, name: str) -> None:
        """Merge the next task's counts (tasks must come in ``order``)."""
        base = self.file_lines.get(task.file_index, 0)
        self.file_lines[task.file_index] = base + st.physical
        self.lines += st.lines
        self.garbage += st.garbage
        self.outside += st.outside
        for lineno, text in st.samples:
            if len(self.samples) < SAMPLE_LIMIT:
                self.samples.append((name, base + lineno, text))
        for k, counts in st.hourly.items():
            acc = self.hourly.setdefault(k, [0, 0, 0, 0, 0])
            for i, v in enumerate(counts):
                acc[i] += v
        for uk, keys in st.uniques.items():
            self.uniques.setdefault(uk, set()).update(keys)
        for w in (BASELINE, OPERATION):
            for d_from, d_to in ((st.status[w], self.status[w]), (st.pages[w], self.pages[w])):
                for k2, v in d_from.items():
                    d_to[k2] = d_to.get(k2, 0) + v
        self._stitch_visits(st)
        if st.operation_lines:
            self.files_with_operation.add(task.file_index)

    def _stitch_visits(self, st: ChunkStats) -> None:
        # A key's first request in this chunk was counted as a new visit; it is
        # not one if the key was seen less than VISIT_GAP before in earlier chunks.
        seen = self.last_seen
        for key, (t, win, hour, bot) in st.first.items():
            prev = seen.get(key)
            if prev is not None and t - prev <= VISIT_GAP:
                self.hourly[(win, hour, bot)][VISITS] -= 1
            chunk_last = st.last[key]
            seen[key] = chunk_last if prev is None else max(prev, chunk_last)


def count_traffic(
    paths: list[Path],
    windows: Windows,
    workers: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Traffic:
    """Read every log and count it; ``progress(bytes_done, bytes_total, lines)`` per task.

    Raises OSError if a file cannot be read.
    """
    tasks = plan_tasks(paths, chunk_bytes)
    total = sum((t.end - t.start) if t.end is not None else t.path.stat().st_size for t in tasks)
    traffic = Traffic(windows)
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        results: Iterator[ChunkStats] = (run_task(t, windows) for t in tasks)
        _merge_all(tasks, results, traffic, progress, total)
        return traffic
    # fork: the workers share the parent's hash secret, so key hashes agree.
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers) as pool:
        results = pool.imap(_run_task_star, [(t, windows) for t in tasks], chunksize=1)
        _merge_all(tasks, results, traffic, progress, total)
    return traffic


def _run_task_star(args: tuple[Task, Windows]) -> ChunkStats:
    return run_task(*args)


def _merge_all(
    tasks: list[Task],
    results: Iterator[ChunkStats],
    traffic: Traffic,
    progress: Callable[[int, int, int], None] | None,
    total: int,
) -> None:
    done = 0
    for task, st in zip(tasks, results):
        traffic.add(task, st, str(task.path))
        done += st.bytes_read
        if progress is not None:
            progress(done, total, traffic.lines)
