"""A bounded viewer crowd that follows status.json like the frame does (run inside
the client's namespace by tests/edgekit.py: ``python -m tests.edgecheck``).

Each worker polls ``/status.json`` at a fixed rate (some requests with a
cache-busting query, an odd Host or Accept-Encoding, as a crowd or an attacker
would send them); when it names a higher sequence than the worker shows, the
worker loads the cut's entry page and its CSV and checks they belong to that
cut (a page of one cut with the time of another is a "mixed" response). Like
the frame, it never steps back: a lower sequence in status.json is counted as a
pointer regression (what the frame protects viewers from), never shown.

Prints one JSON document: requests, errors (with times), mixed responses,
backward steps, pointer regressions, the sequences shown in order, and
per-status counts. Bounded: ``--seconds`` and ``--rate`` per worker; SIGTERM
ends the run early (the summary is still printed).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import re
import signal
import sys
import threading
import time
from typing import Any

STOP = threading.Event()
"""Set by SIGTERM: every worker ends after its current request."""


class Worker:
    """One viewer: one keep-alive connection, re-made after any error."""

    def __init__(self, host: str, rate: float, deadline: float, seed: int) -> None:
        self.host = host
        self.period = 1.0 / rate
        self.deadline = deadline
        self.rng = random.Random(seed)
        self.conn: http.client.HTTPConnection | None = None
        self.shown = 0
        self.sequences: list[int] = []
        self.requests = 0
        self.errors: list[tuple[float, str]] = []
        self.mixed: list[str] = []
        self.backward = 0
        self.regressions = 0
        self.statuses: dict[str, int] = {}
        self.missing_release = 0
        self.answered: list[float] = []
        """Times of the successful status.json answers."""

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One GET; raises OSError or HTTPException on a failed exchange."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, 80, timeout=5)
        self.requests += 1
        try:
            self.conn.request("GET", path, headers=headers or {})
            response = self.conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        self.statuses[str(response.status)] = self.statuses.get(str(response.status), 0) + 1
        if response.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
        return response.status, body

    def pointer(self) -> tuple[str, dict[str, str]]:
        """The status.json request, now and then in a cache-busting variant."""
        roll = self.rng.random()
        if roll < 0.2:
            return f"/status.json?{self.rng.random()}", {}
        if roll < 0.3:
            return "/status.json", {"Host": f"x{self.rng.randrange(10**6)}.example"}
        if roll < 0.4:
            return "/status.json", {"Accept-Encoding": self.rng.choice(["br", "gzip, zz", "x"])}
        return "/status.json", {"Accept-Encoding": "gzip"}

    def step(self) -> None:
        path, headers = self.pointer()
        status, body = self.get(path, headers)
        if status != 200:
            self.errors.append((time.time(), f"status.json {status}"))
            return
        self.answered.append(time.time())
        doc = json.loads(body)
        sequence = doc.get("sequence") or 0
        if sequence < self.shown:
            self.regressions += 1
            return
        if sequence == self.shown:
            return
        entry = "/" + doc["entry"]
        status, page = self.get(entry)
        if status == 404:
            self.missing_release += 1
            self.errors.append((time.time(), f"{entry} 404"))
            return
        if status != 200:
            self.errors.append((time.time(), f"{entry} {status}"))
            return
        csv_path = entry.rsplit("/", 1)[0] + "/datos/COAH_AYUN_2021.csv"
        status, csv = self.get(csv_path)
        if status != 200:
            self.errors.append((time.time(), f"{csv_path} {status}"))
            return
        rows = len(re.findall(rb",05,AYUNTAMIENTO,", csv))
        if f"<h1>Corte {sequence}</h1>".encode() not in page or rows != sequence:
            self.mixed.append(f"status {sequence}: page {page[:40]!r}, csv rows {rows}")
            return
        if sequence < self.shown:
            self.backward += 1
        self.shown = sequence
        self.sequences.append(sequence)

    def run(self) -> None:
        next_at = time.monotonic()
        while time.time() < self.deadline and not STOP.is_set():
            try:
                self.step()
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                self.errors.append((time.time(), f"{type(exc).__name__}: {exc}"))
            next_at += self.period
            pause = next_at - time.monotonic()
            if pause > 0:
                STOP.wait(pause)
            else:
                next_at = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    """Run the crowd; print the JSON summary."""
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=10.0, help="requests/s per worker")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: STOP.set())
    deadline = time.time() + min(args.seconds, 600.0)
    workers = [Worker(args.host, args.rate, deadline, i) for i in range(args.workers)]
    threads = [threading.Thread(target=w.run) for w in workers]
    started = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = sorted(e for w in workers for e in w.errors)
    statuses: dict[str, int] = {}
    for w in workers:
        for k, v in w.statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    answered = sorted(t for w in workers for t in w.answered)
    gaps = [(b - a, a) for a, b in zip(answered, answered[1:])] or [(0.0, started)]
    gap, gap_from = max(gaps)
    summary: dict[str, Any] = {
        "started": started,
        "ended": time.time(),
        "requests": sum(w.requests for w in workers),
        "errors": len(errors),
        "error_times": [e[0] for e in errors],
        "error_samples": [e[1] for e in errors[:10]],
        "mixed": sum(len(w.mixed) for w in workers),
        "mixed_samples": [m for w in workers for m in w.mixed][:5],
        "backward": sum(w.backward for w in workers),
        "pointer_regressions": sum(w.regressions for w in workers),
        "missing_release": sum(w.missing_release for w in workers),
        "sequences": [w.sequences for w in workers],
        "statuses": statuses,
        "max_gap": gap,
        "max_gap_from": gap_from,
    }
    json.dump(summary, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
