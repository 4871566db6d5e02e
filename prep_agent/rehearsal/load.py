"""A bounded HTTP load of simulated frames: per difusor, N readers that poll as
``prep_agent/web/static/frame.js`` does.

Each reader is one thread with its own keep-alive connection (as a browser
keeps one to the difusor). Its first look comes at a random phase within the
poll interval, then it GETs ``status.json`` every ``poll`` seconds
(``Cache-Control: no-cache``, as the frame asks). When the release changes it
GETs the new entry page once: the frame's confirm request; the iframe load that
follows asks for the same URL, which a browser then takes from its cache
(release files are ``immutable``), so one GET stands for both. An entry page
that does not answer 2xx is asked again with ``status.json`` two seconds later,
as the frame's ``retrySoon`` does.

Findings (``viewer.Finding``, judged by ``report.judge_findings`` exactly as a
viewer's): an error answer (non-2xx, or no answer twice in a row: one
unanswered request is counted in ``no_answer`` and the frame just looks again),
and a sequence or cut time that went backwards for one reader. A request on a
reused connection that the server had closed while idle is sent again once on
a new connection, as browsers do. Each reader is bounded in count
(``max_requests``) and time (the night's horizon) and stops on ``stop``.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from prep_agent.rehearsal.viewer import MAX_BYTES, Finding

TIMEOUT = 2.0
"""Seconds a reader waits for an answer (the viewer's)."""
RETRY_SECONDS = 2.0
"""Seconds after an entry page that did not answer 2xx before the reader looks again
(frame.js ``retrySoon``)."""
USER_AGENT = "prep-agent-rehearsal-load"
_CLOSED_WHILE_IDLE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


def max_requests(max_seconds: float, poll: float) -> int:
    """The most GETs one reader makes in ``max_seconds``: a look every ``poll`` or
    sooner after a missing entry page, each with at most one entry page."""
    return 2 * (int(max_seconds / min(poll, RETRY_SECONDS)) + 1)


@dataclass
class Reader:
    """One simulated frame of one difusor, run in its own thread."""

    index: int
    host: str
    port: int
    prefix: str
    """The difusor URL's path (usually empty), before ``/status.json``."""
    poll: float
    requests: int = 0
    answers: Counter[int] = field(default_factory=Counter)
    no_answer: int = 0
    latencies: list[float] = field(default_factory=list)
    """Seconds from sending a request to having read its answer."""
    findings: list[Finding] = field(default_factory=list)
    cpu_seconds: float = 0.0
    """CPU time of this reader's thread, once it ended."""
    _conn: http.client.HTTPConnection | None = None
    _used: bool = False
    _missed: bool = False
    _last: tuple[int, datetime | None] | None = None
    _release: str | None = None

    def run(self, deadline: float, stop: threading.Event, phase: float, most: int) -> None:
        """Look at the difusor until ``stop``, ``deadline`` (monotonic) or ``most`` GETs."""
        try:
            tick = time.monotonic() + phase  # the frame's setInterval
            due = tick
            while self.requests < most and time.monotonic() < deadline:
                if stop.wait(max(0.0, due - time.monotonic())):
                    return
                if due >= tick:  # a late timer fires once, as a browser's does
                    now = time.monotonic()
                    tick = tick + self.poll if tick + self.poll > now else now + self.poll
                confirmed = self.look()
                due = tick if confirmed else min(tick, time.monotonic() + RETRY_SECONDS)
        finally:
            self._close()
            self.cpu_seconds = time.thread_time()

    def look(self) -> bool:
        """One look at ``status.json`` (and a new release's entry page), as the frame's
        ``check``; False when the entry page was missing and the frame would look
        again ``RETRY_SECONDS`` later."""
        code, body = self.get("/status.json", {"Cache-Control": "no-cache"})
        if not 200 <= code <= 299:
            return True
        try:
            status: dict[str, Any] = json.loads(body)
        except ValueError:
            self.note("error", "status.json is not JSON")
            return True
        sequence, release, entry = (
            status.get("sequence"),
            status.get("release"),
            status.get("entry"),
        )
        if not isinstance(sequence, int) or not isinstance(release, str):
            return True  # no cut yet
        self.follow(sequence, status.get("cut_time"))
        if release == self._release or not isinstance(entry, str):
            return True
        code, _ = self.get(entry if entry.startswith("/") else f"/{entry}", {})
        if not 200 <= code <= 299:
            return False
        self._release = release
        return True

    def follow(self, sequence: int, cut_time: object) -> None:
        """Note a sequence or cut time older than this reader's last one."""
        try:
            moment: datetime | None = datetime.fromisoformat(str(cut_time))
        except ValueError:
            moment = None
        if self._last is not None:
            last_seq, last_time = self._last
            older = moment is not None and last_time is not None and moment < last_time
            if sequence < last_seq or older:
                self.note("backwards", f"{last_seq} {last_time} -> {sequence} {cut_time}")
        self._last = (sequence, moment)

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """GET ``path`` on this reader's connection: (status, body), status 0 when it
        did not answer within ``TIMEOUT``; a non-2xx answer, or a second one in a
        row not answered, is noted as an ``error``."""
        self.requests += 1
        started = time.monotonic()
        code, body = self._exchange(self.prefix + path, headers)
        if code == 0:
            self.no_answer += 1
            if self._missed:
                self.note("error", f"{path}: no answer twice in a row")
            self._missed = True
            return code, body
        self._missed = False
        self.latencies.append(time.monotonic() - started)
        self.answers[code] += 1
        if not 200 <= code <= 299:
            self.note("error", f"{path}: HTTP {code}")
        return code, body

    def _exchange(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in (1, 2):
            reused = self._conn is not None and self._used
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
                self._used = False
            try:
                self._conn.request("GET", path, headers={"User-Agent": USER_AGENT, **headers})
                self._used = True
                response = self._conn.getresponse()
                body = response.read(MAX_BYTES)
                if response.will_close or not response.isclosed():
                    self._close()  # the server ends it, or an answer too long to read
                return int(response.status), body
            except _CLOSED_WHILE_IDLE:
                self._close()
                if not (reused and attempt == 1):
                    return 0, b""
            except (OSError, http.client.HTTPException):
                self._close()
                return 0, b""
        return 0, b""

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def note(self, kind: str, detail: str) -> None:
        """Record a finding, naming this reader."""
        self.findings.append(Finding(time.time(), kind, f"reader {self.index}: {detail}"))


class Load:
    """The simulated frames of one difusor: ``readers`` threads polling ``url``."""

    def __init__(self, service_id: str, url: str, readers: int, poll: float) -> None:
        parts = urlsplit(url)
        self.service_id, self.url, self.poll = service_id, url, poll
        self.readers = [
            Reader(i, parts.hostname or "127.0.0.1", parts.port or 80, parts.path.rstrip("/"), poll)
            for i in range(readers)
        ]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = self._ended = 0.0

    def start(self, max_seconds: float, seed: int | None = None) -> None:
        """Start every reader's thread; each ends by ``stop`` or after ``max_seconds``."""
        phases = random.Random(seed)
        most = max_requests(max_seconds, self.poll)
        self._started = time.monotonic()
        deadline = self._started + max_seconds
        for reader in self.readers:
            phase = phases.uniform(0, self.poll)
            thread = threading.Thread(
                target=reader.run,
                args=(deadline, self._stop, phase, most),
                name=f"load-{self.service_id}-{reader.index}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """End every reader and wait for them (a reader in a request ends within
        ``TIMEOUT`` of each of at most two attempts)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=4 * TIMEOUT + 1)
        self._ended = time.monotonic()

    @property
    def findings(self) -> list[Finding]:
        """Every reader's findings, oldest first."""
        return sorted((f for r in self.readers for f in list(r.findings)), key=lambda f: f.at)

    @property
    def latencies(self) -> list[float]:
        """Every answered request's latency (seconds)."""
        return [t for r in self.readers for t in list(r.latencies)]

    def figures(self) -> dict[str, Any]:
        """Readers, poll seconds, requests, answers by status, unanswered requests,
        requests per second over the time it ran, and the readers' CPU seconds."""
        answers: Counter[int] = Counter()
        for reader in self.readers:
            answers.update(reader.answers)
        requests = sum(r.requests for r in self.readers)
        elapsed = (self._ended or time.monotonic()) - self._started if self._started else 0.0
        return {
            "readers": len(self.readers),
            "poll_seconds": self.poll,
            "requests": requests,
            "answers": {str(code): n for code, n in sorted(answers.items())},
            "no_answer": sum(r.no_answer for r in self.readers),
            "requests_per_second": round(requests / elapsed, 2) if elapsed > 0 else 0.0,
            "cpu_seconds": round(sum(r.cpu_seconds for r in self.readers), 3),
        }
