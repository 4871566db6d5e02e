"""The rehearsal's HTTP load of simulated frames (``prep_agent/rehearsal/load.py``)
against a real HTTP/1.1 server in this process (``http.server`` on loopback): it
keeps one connection per reader, fetches each new release's entry page, records
error answers and a sequence or cut time that went backwards, and the report's
judging (``report.build``, real code) fails the verdict on them; errors inside a
fault's window are excused, backwards never.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from prep_agent.rehearsal import report
from prep_agent.rehearsal.load import Load
from prep_agent.rehearsal.viewer import Viewer

pytestmark = pytest.mark.core


class Difusor(ThreadingHTTPServer):
    """Answers ``status.json`` from a script: the n-th request (all readers together)
    gets ``script[n]`` (the last one from then on): (sequence, cut minute), or an
    HTTP status for an error answer. Entry pages of the scripted releases answer 200."""

    daemon_threads = True

    def __init__(self, script: Sequence[tuple[int, int] | int], idle: float | None = None) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.script, self.idle = script, idle
        self.looks = self.connections = 0
        self.entries: list[str] = []
        self.lock = threading.Lock()

    def answer(self) -> tuple[int, bytes]:
        with self.lock:
            step = self.script[min(self.looks, len(self.script) - 1)]
            self.looks += 1
        if isinstance(step, int):
            return step, b"error"
        sequence, minute = step
        status = {"sequence": sequence, "release": f"r{sequence}",
                  "cut_time": f"2021-06-06T20:{minute:02d}:00-06:00",
                  "entry": f"releases/r{sequence}/index.html"}  # fmt: skip
        return 200, json.dumps(status).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as waitress and Varnish
    server: Difusor

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.idle)  # None: never closes an idle one
        with self.server.lock:
            self.server.connections += 1

    def do_GET(self) -> None:
        if self.path == "/status.json":
            code, body = self.server.answer()
        elif self.path.startswith("/releases/"):
            with self.server.lock:
                self.server.entries.append(self.path)
            code, body = 200, b"<html>corte</html>"
        else:
            code, body = 404, b""
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serving(
    script: Sequence[tuple[int, int] | int], idle: float | None = None
) -> Iterator[Difusor]:
    server = Difusor(script, idle)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def run_load(
    server: Difusor, readers: int, looks: int, poll: float = 0.1, entries: int = 0
) -> Load:
    """A load on ``server`` until it answered ``looks`` status.json requests and
    ``entries`` entry pages (bounded)."""
    load = Load("a", f"http://127.0.0.1:{server.server_address[1]}", readers, poll)
    load.start(20, seed=1)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if server.looks >= looks and len(server.entries) >= entries:
            break
        time.sleep(0.02)
    load.stop()
    assert server.looks >= looks and len(server.entries) >= entries, server.entries
    return load


def records(load: Load, faults: list[dict[str, Any]]) -> dict[str, Any]:
    """The records of a one-cut night of difusor ``a``, its load as given."""
    start = time.time() - 30
    viewer = Viewer("a", load.url, Path("allowed_signers"))
    viewer.first_seen = {1: start + 1}
    return {
        "options": {"period": 2.0, "mode": "loopback", "readers": len(load.readers)},
        "started": start, "ended": time.time(), "placed": {1: start},
        "difusores": [{"service_id": "a", "url": load.url, "kind": "standalone"}],
        "journals": {"a": {1: start + 0.5}}, "deliveries": {}, "viewers": {"a": viewer},
        "browser": None, "browser_unavailable": "not asked for", "faults": faults,
        "timeline": [], "memorias": {}, "load": {"a": load},
    }  # fmt: skip


def fault_over(at: float) -> dict[str, Any]:
    """A detected network cut of ``a`` whose window covers ``at``."""
    return {"kind": "network-cut", "difusor": "a", "at_cut": 1, "injected_at": at - 5,
            "expected": "", "detected_at": at - 4, "detected_by": "collector", "detail": "",
            "status": "detected", "window": [at - 5, at + 5]}  # fmt: skip


def test_a_healthy_difusor_is_read_on_one_connection_per_reader_and_passes() -> None:
    script: list[tuple[int, int] | int] = [*[(1, 0)] * 6, (2, 10)]
    for server in serving(script):
        load = run_load(server, readers=3, looks=15, entries=6)
        figures = load.figures()
        assert figures["readers"] == 3 and figures["no_answer"] == 0
        assert figures["requests"] == server.looks + len(server.entries)
        assert figures["answers"] == {"200": figures["requests"]}
        assert figures["requests_per_second"] > 0 and figures["cpu_seconds"] >= 0
        assert server.connections == 3  # keep-alive: one connection per reader
        # Each reader confirmed each release it saw once (the frame's confirm).
        assert (
            sorted(server.entries)
            == ["/releases/r1/index.html"] * 3 + ["/releases/r2/index.html"] * 3
        )
        assert load.findings == []
        doc = report.build(records(load, []))
        assert doc["verdict"] == "pass", doc["problems"]
        part = doc["load"]["difusores"]["a"]
        assert part["requests"] == figures["requests"] and part["findings"] == []
        assert part["latency_ms"]["p50"] is not None and part["latency_ms"]["p99"] is not None
        page = report.render(doc)
        assert "Carga HTTP de marcos simulados" in page and "<td>a</td><td>3</td>" in page


def test_a_connection_the_server_closed_while_idle_is_opened_again_without_an_error() -> None:
    for server in serving([(1, 0)], idle=0.05):
        load = run_load(server, readers=2, looks=8, poll=0.2)
        assert server.connections > 2  # the server did close idle connections
        assert load.findings == [] and load.figures()["no_answer"] == 0


def test_errors_and_a_cut_going_backwards_are_found_and_fail_the_verdict() -> None:
    # One reader: 1 -> 2 -> 3 with an older cut time -> 500 -> 1 (older sequence).
    script: list[tuple[int, int] | int] = [(1, 0), (2, 10), (3, 5), 500, (1, 20)]
    for server in serving(script):
        load = run_load(server, readers=1, looks=6)
        kinds = [(f.kind, f.detail) for f in load.findings]
        assert kinds == [
            ("backwards", "reader 0: 2 2021-06-06 20:10:00-06:00 -> 3 2021-06-06T20:05:00-06:00"),
            ("error", "reader 0: /status.json: HTTP 500"),
            ("backwards", "reader 0: 3 2021-06-06 20:05:00-06:00 -> 1 2021-06-06T20:20:00-06:00"),
        ], kinds
        assert load.figures()["answers"]["500"] == 1
        doc = report.build(records(load, []))
        assert doc["verdict"] == "fail"
        assert [p.split(" (")[0] for p in doc["problems"]] == [
            "load of a: backwards",
            "load of a: error",
        ], doc["problems"]
        assert len(doc["load"]["difusores"]["a"]["findings"]) == 3
        # Under a fault the error is excused, as a viewer's; going backwards never is.
        at = next(f.at for f in load.findings if f.kind == "error")
        doc = report.build(records(load, [fault_over(at)]))
        assert [p.split(" (")[0] for p in doc["problems"]] == ["load of a: backwards"]
        assert "NO APROBADO" in report.render(doc)
