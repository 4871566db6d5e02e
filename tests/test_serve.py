"""The embedded server over real HTTP: frame, status.json, releases, health, metrics."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
from waitress import wasyncore

from prep_agent.agent.config import Config
from prep_agent.core.cuttime import format_cut_time
from prep_agent.core.manifest import Limits, parse_manifest
from prep_agent.web.health import Snapshot, SystemReadings, health_document
from prep_agent.web.server import PublicApp, make_server
from tests.kit import AgentDaemon, Institute, free_port, make_config, minute_ago, wait_for


@dataclass
class Running:
    config: Config
    inst: Institute
    url: str

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, timeout=5, **kw)

    def published(self, sequence: int) -> bool:
        try:
            return bool(self.get("/status.json").json()["sequence"] == sequence)
        except (requests.RequestException, ValueError):
            return False


def start(tmp_path: Path, **settings: Any) -> Iterator[Running]:
    inst = Institute(tmp_path / "inst")
    port = free_port()
    config = make_config(tmp_path, inst, listen=f"127.0.0.1:{port}", **settings)
    agent = AgentDaemon(tmp_path / "prep-agent.conf").start()
    try:
        yield Running(config, inst, f"http://127.0.0.1:{port}")
    finally:
        code = agent.stop()
    assert code == 0, agent.output()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Running]:
    yield from start(
        tmp_path,
        frame_ancestors="https://portal.example.mx https://www.example.mx",
        difusor_name="Diario de Prueba",
    )


def test_frame_status_and_release(served: Running) -> None:
    assert served.get("/readyz").status_code == 503
    before = served.get("/")
    assert "La publicación de los Resultados Electorales Preliminares iniciará" in before.text
    assert served.get("/status.json").json()["state"] == "no-cut"

    when = minute_ago(5)
    served.inst.cut(served.config.inbox, 1, cut_time=when)
    wait_for(lambda: served.published(1))
    status = served.get("/status.json").json()
    assert status["cut_time"] == when.isoformat() and status["state"] == "current"

    frame = served.get("/")
    assert frame.headers["Content-Type"] == "text/html; charset=utf-8"
    assert '<html lang="es-MX">' in frame.text and "Diario de Prueba" in frame.text
    assert "Corte de información: <time" in frame.text
    assert f"{when:%d/%m/%Y %H:%M} h (UTC-6)" in frame.text
    assert 'aria-live="polite"' in frame.text
    csp = frame.headers["Content-Security-Policy"]
    assert "frame-ancestors https://portal.example.mx https://www.example.mx" in csp
    assert "script-src 'self'" in csp
    assert frame.headers["X-Content-Type-Options"] == "nosniff"
    assert frame.headers["Referrer-Policy"] == "strict-origin-when-cross-origin"
    assert "stale-while-revalidate" in frame.headers["Cache-Control"]
    assert "stale-if-error" in frame.headers["Cache-Control"]

    entry = served.get("/" + status["entry"])
    assert entry.content == served.inst.files(when, 1)["index.html"]
    assert entry.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert entry.headers["Content-Security-Policy"] == (
        "frame-ancestors 'self' https://portal.example.mx https://www.example.mx"
    )
    again = served.get("/" + status["entry"], headers={"If-None-Match": entry.headers["ETag"]})
    assert again.status_code == 304
    head = requests.head(served.url + "/" + status["entry"], timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(entry.content)
    assert served.get("/readyz").status_code == 200
    sig = served.get(f"/cortes/{status['release']}/.well-known/prep-cut/manifest.json.sig")
    assert sig.content.startswith(b"-----BEGIN SSH SIGNATURE-----")


@pytest.mark.parametrize(
    "path",
    [
        "/cortes/../state.json",
        "/cortes/%2e%2e/state.json",
        "/cortes/x/..%2f..%2fstate.json",
        "/state.json",
        "/journal.jsonl",
        "/current/index.html",
        "/releases/",
        "/static/../state.json",
        "/cortes/",
        "/cortes/nope/index.html",
    ],
)
def test_private_files_are_not_reachable(served: Running, path: str) -> None:
    served.inst.cut(served.config.inbox, 1, cut_time=minute_ago(5))
    wait_for(lambda: served.published(1))
    response = requests.get(served.url + path, timeout=5)
    assert response.status_code == 404, path


def test_only_get_and_head(served: Running) -> None:
    assert requests.post(served.url + "/status.json", timeout=5).status_code == 405


def test_health_and_metrics(served: Running) -> None:
    served.inst.cut(served.config.inbox, 1, cut_time=minute_ago(5))
    wait_for(lambda: served.published(1))
    when = minute_ago(4)
    files = served.inst.files(when, 2)
    served.inst.deliver(
        served.config.inbox, files, served.inst.manifest(files, 2, when, election="x")
    )
    wait_for(lambda: served.get("/metrics").text.count("prep_cuts_rejected_total{") == 1)

    health = served.get("/health")
    assert health.status_code == 200
    assert health.headers["Content-Type"] == "application/health+json"
    assert health.headers["Cache-Control"] == "no-store"
    doc = health.json()
    # The refused cut 2 is newer than the published cut 1: cut:last-rejection warns.
    assert doc["status"] == "warn" and doc["serviceId"] == "difusor"
    checks = doc["checks"]
    assert checks["cut:sequence"][0]["observedValue"] == 1
    assert checks["cut:last-rejection"][0]["observedValue"].startswith("wrong-election")
    assert checks["cut:last-rejection"][0]["status"] == "warn"
    assert checks["inbox:watcher"][0]["observedValue"] == "inotify"
    assert {"disk:utilization", "memory:utilization", "cpu:utilization"} <= set(checks)

    metrics = served.get("/metrics")
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = metrics.text
    assert "prep_cut_sequence 1\n" in text
    assert 'prep_cuts_rejected_total{reason="wrong-election"} 1' in text
    assert 'prep_publish_duration_seconds_bucket{le="+Inf"} 1' in text
    assert "prep_cut_timestamp_seconds " in text and "prep_cut_age_seconds " in text


def test_public_health_view_and_token(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3creto\n")
    for running in start(tmp_path, allow="10.9.9.0/24", token_file=token):
        public = running.get("/health").json()
        assert set(public) == {"status", "serviceId", "time", "checks"}
        assert all(k.startswith("cut:") for k in public["checks"])
        assert running.get("/metrics").status_code == 403
        bearer = {"Authorization": "Bearer s3creto"}
        full = running.get("/health", headers=bearer).json()
        assert "disk:utilization" in full["checks"] and "version" in full
        assert running.get("/metrics", headers=bearer).status_code == 200
        wrong = running.get("/health", headers={"Authorization": "Bearer nope"}).json()
        assert "version" not in wrong


def snapshot(**changes: Any) -> Snapshot:
    manifest = parse_manifest(
        json.dumps(
            {
                "format": "prep-cut/1",
                "election": "e",
                "sequence": 3,
                "cut_time": "2021-06-06T20:30:00-05:00",
                "signed_at": "2021-06-06T20:31:00-05:00",
                "entry": "a",
                "files": [{"path": "a", "size": 0, "sha256": "0" * 64}],
            }
        ).encode(),
        Limits(),
    )
    base: dict[str, Any] = {
        "now": datetime(2021, 6, 7, 1, 40, tzinfo=timezone.utc),
        "service_id": "d",
        "manifest": manifest,
        "manifest_sha256": "ab" * 32,
        "stale_periods": 3,
        "last_rejection": None,
        "watcher_mode": "inotify",
        "watcher_fallback": False,
        "agent_alive": True,
        "storage_writable": True,
        "system": SystemReadings(disk_percent=40.0, memory_percent=30.0, cpu_percent=5.0),
    }
    base.update(changes)
    return Snapshot(**base)


@pytest.mark.core
def test_health_states() -> None:
    assert health_document(snapshot())["status"] == "pass"
    stale = snapshot(now=datetime(2021, 6, 7, 2, 1, tzinfo=timezone.utc))
    doc = health_document(stale)
    assert doc["status"] == "warn" and doc["checks"]["cut:age"][0]["status"] == "warn"
    assert (
        health_document(snapshot(watcher_fallback=True, watcher_mode="polling"))["status"] == "warn"
    )
    assert health_document(snapshot(agent_alive=False, system=None))["status"] == "fail"
    assert health_document(snapshot(storage_writable=False))["status"] == "fail"
    assert health_document(snapshot(manifest=None, manifest_sha256=None))["status"] == "warn"
    assert health_document(snapshot(push_configured=True))["status"] == "warn"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2021-06-06T20:30:00-05:00", "06/06/2021 20:30 h (UTC-5)"),
        ("2021-06-06T20:30:59-06:00", "06/06/2021 20:30 h (UTC-6)"),
        ("2021-06-07T01:30:00Z", "07/06/2021 01:30 h (UTC)"),
        ("2021-06-06T20:30:00+05:30", "06/06/2021 20:30 h (UTC+5:30)"),
    ],
)
@pytest.mark.core
def test_cut_time_in_its_own_offset(text: str, expected: str) -> None:
    from prep_agent.core.manifest import parse_rfc3339

    assert format_cut_time(text, parse_rfc3339(text, "t")) == expected


@pytest.mark.core
def test_file_cache_follows_replacement_and_stays_bounded(tmp_path: Path) -> None:
    """Small files are served from memory; a file replaced by rename is seen after
    ``recheck``; the cache never holds more than ``max_bytes``."""
    from prep_agent.web.server import SHORT, FileCache

    cache = FileCache(max_bytes=10_000, recheck=0.2)
    target = tmp_path / "status.json"
    target.write_text('{"sequence": 1}')

    def get(path: Path) -> bytes:
        seen: list[str] = []
        body = cache.send({"REQUEST_METHOD": "GET"}, lambda s, h: seen.append(s), path, SHORT, [])
        assert seen == ["200 OK"]
        return b"".join(body)

    assert get(target) == b'{"sequence": 1}'
    new = tmp_path / "new.json"
    new.write_text('{"sequence": 2}')
    new.replace(target)
    time.sleep(0.3)
    assert get(target) == b'{"sequence": 2}'
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x" * 4000)
        get(tmp_path / f"f{i}")
        assert cache.size <= 10_000


def _fallback(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("404 Not Found", [("Content-Length", "0")])
    return [b""]


@pytest.mark.parametrize("threads", [2, 8])
def test_server_loop_does_not_spin_under_load(
    tmp_path: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """waitress's loop must not busy-wait on connections whose worker is answering.

    64 keep-alive connections (wrk) on status.json for 2 s, counting the turns of
    waitress's loop (its select() calls, passed through). With waitress's own
    connection class the loop spun while workers held the output lock: 36 turns per
    response with 8 threads, ~600 with 2, and a few hundred responses per second;
    with ``serve._Channel`` it turns about once per response or less.
    """
    turns = [0]
    real_poll = wasyncore.poll

    def counted(timeout: float = 0.0, map: Any = None) -> None:
        turns[0] += 1
        real_poll(timeout, map)

    monkeypatch.setattr(wasyncore, "poll", counted)
    config = make_config(tmp_path, Institute(tmp_path / "inst"), listen="127.0.0.1:0")
    config.public.mkdir(parents=True, exist_ok=True)
    (config.public / "status.json").write_bytes(b'{"sequence": 1}' + b" " * 400)
    server = make_server(config, PublicApp(config, _fallback), threads=threads)
    server.start()
    try:
        out = subprocess.run(
            ["wrk", "-t1", "-c64", "-d2s", f"http://{server.address}/status.json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    finally:
        server.stop()
    responses = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    assert "Non-2xx" not in out and "Socket errors" not in out, out
    assert responses > 1000, out
    assert turns[0] / responses < 5, f"{turns[0]} loop turns for {responses} responses\n{out}"
