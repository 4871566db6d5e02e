"""The origin's side of the HA edge (packaging/ha): tag headers, ``/readyz?lag=``
and the soft purge after each swap, on a real ``prep-agent run`` process.

The "Varnish nodes" here are real HTTP servers of the test that record what
arrives (the drills in tests/test_edge_ha.py use the real Varnish); one node
refuses connections and one accepts and never answers, so a purge that fails or
hangs is seen not to delay publication and to be counted in /metrics.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from prep_agent.web.health import behind
from prep_agent.web.purge import POINTER_TAG, RELEASE_TAG, SOFTPURGE_HEADER, TAG_HEADERS
from tests.kit import OFFSET, AgentDaemon, Institute, free_port, make_config, wait_for
from tests.test_health_checks import NOW, PERIOD, manifest, snapshot

TOKEN = "ha-origin-test-token"


class Node:
    """A real HTTP server standing where a Varnish node would: records each PURGE."""

    def __init__(self) -> None:
        self.purges: list[tuple[str, str, float]] = []
        recorded = self.purges

        class Handler(BaseHTTPRequestHandler):
            def do_PURGE(self) -> None:
                tag = self.headers.get(SOFTPURGE_HEADER, "")
                recorded.append((self.path, tag, time.time()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def nodes() -> Iterator[tuple[Node, str, str, socket.socket]]:
    """A recording node, a refusing address, and a silent one (listens, never reads)."""
    node = Node()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    refused = f"http://127.0.0.1:{free_port()}"
    try:
        yield node, refused, f"http://127.0.0.1:{silent.getsockname()[1]}", silent
    finally:
        node.close()
        silent.close()


def start_agent(tmp_path: Path, institute: Institute, **settings: Any) -> AgentDaemon:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "token").write_text(TOKEN)
    make_config(tmp_path, institute, rescan_interval=0.2, token_file=tmp_path / "token", **settings)
    return AgentDaemon(tmp_path / "prep-agent.conf", log=tmp_path / "agent.log").start()


def published(agent: AgentDaemon, sequence: int) -> bool:
    events = agent.journal()
    return any(e["event"] == "cut-published" and e["sequence"] == sequence for e in events)


def metrics(agent: AgentDaemon) -> str:
    r = requests.get(
        f"http://{agent.address}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5
    )
    assert r.status_code == 200
    return r.text


@pytest.mark.core
def test_behind_only_past_the_period_plus_lag() -> None:
    due = manifest(3).cut_time + timedelta(seconds=PERIOD)
    assert behind(snapshot(now=due + timedelta(seconds=30)), "30") is None
    assert behind(snapshot(now=due + timedelta(seconds=31)), "30") is not None
    assert behind(snapshot(now=due + timedelta(seconds=31)), "junk") is not None  # as 0
    final = replace(manifest(3), final=True)
    assert behind(snapshot(now=NOW + timedelta(days=1), manifest=final), "0") is None
    assert behind(snapshot(manifest=None), "0") is None


def test_readyz_lag_and_sequence_header(tmp_path: Path) -> None:
    institute = Institute(tmp_path / "institute")
    agent = start_agent(tmp_path / "o", institute)
    try:
        inbox = tmp_path / "o" / "inbox"
        # Cut 1: 20 minutes old with a 5-minute period, so a newer cut was due.
        old = (datetime.now(OFFSET) - timedelta(minutes=20)).replace(second=0, microsecond=0)
        institute.cut(inbox, 1, old, period_seconds=300)
        wait_for(lambda: published(agent, 1), 15, "cut 1 published")
        base = f"http://{agent.address}/readyz"
        plain, lagging = requests.get(base, timeout=5), requests.get(f"{base}?lag=30", timeout=5)
        assert (plain.status_code, plain.headers["X-Prep-Sequence"]) == (200, "1")
        assert lagging.status_code == 503 and lagging.text.startswith("behind: cut 1")
        assert lagging.headers["X-Prep-Sequence"] == "1"
        assert lagging.headers["Cache-Control"] == "no-store"
        # Cut 2 arrives: within its period, the origin is back for the pointers.
        fresh = (datetime.now(OFFSET) - timedelta(minutes=1)).replace(second=0, microsecond=0)
        institute.cut(inbox, 2, fresh, period_seconds=300)
        wait_for(lambda: published(agent, 2), 15, "cut 2 published")
        back = requests.get(f"{base}?lag=30", timeout=5)
        assert (back.status_code, back.headers["X-Prep-Sequence"]) == (200, "2")
    finally:
        agent.stop()


def test_tag_headers_on_pointers_and_releases_never_on_errors(tmp_path: Path) -> None:
    institute = Institute(tmp_path / "institute")
    agent = start_agent(tmp_path / "o", institute)
    try:
        institute.cut(tmp_path / "o" / "inbox", 1)
        wait_for(lambda: published(agent, 1), 15, "cut 1 published")
        base = f"http://{agent.address}"
        status = requests.get(f"{base}/status.json", timeout=5)
        entry = status.json()["entry"]
        for path, tag in (
            ("/", POINTER_TAG),
            ("/status.json", POINTER_TAG),
            (f"/{entry}", RELEASE_TAG),
        ):
            r = requests.get(base + path, timeout=5)
            assert r.status_code == 200, path
            assert [r.headers[h] for h in TAG_HEADERS] == [tag] * len(TAG_HEADERS), path
        missing = requests.get(f"{base}/cortes/{'0' * 16}-none/index.html", timeout=5)
        assert missing.status_code == 404
        assert not [h for h in TAG_HEADERS if h in missing.headers]
    finally:
        agent.stop()


def test_soft_purge_after_each_swap_never_delays_publication(
    tmp_path: Path, nodes: tuple[Node, str, str, socket.socket]
) -> None:
    node, refused, silent, _ = nodes
    institute = Institute(tmp_path / "institute")
    agent = start_agent(
        tmp_path / "o", institute, nodes=f"{node.url} {refused} {silent}", timeout=3
    )
    try:
        inbox = tmp_path / "o" / "inbox"
        delivered = time.time()
        institute.cut(inbox, 1)
        wait_for(lambda: published(agent, 1), 15, "cut 1 published")
        wait_for(lambda: len(node.purges) >= 1, 10, "purge 1 received")
        # Not at once: nginx may serve the previous status.json for 1 s after the swap.
        assert node.purges[0][2] - delivered >= 1.4, node.purges[0][2] - delivered
        # The silent node now holds purge 1 for its whole timeout (3 s). Cut 2 is
        # published well before that: publication never waits on a node.
        started = time.monotonic()
        institute.cut(inbox, 2)
        wait_for(lambda: published(agent, 2), 15, "cut 2 published")
        took = time.monotonic() - started
        assert took < 2.0, f"cut 2 took {took:.2f} s to publish"
        wait_for(lambda: len(node.purges) >= 2, 10, "purge 2 received")
        assert [(p, t) for p, t, _ in node.purges] == [("/", POINTER_TAG)] * 2
        # Counted once each node's answer (or its failure) is in: a moment after.
        counted = (
            f'prep_purge_total{{node="{node.url}",result="ok"}} 2',
            f'prep_purge_total{{node="{refused}",result="failed"}} 2',
        )
        wait_for(lambda: all(c in metrics(agent) for c in counted), 10, "purges counted")
        wait_for(
            lambda: f'prep_purge_total{{node="{silent}",result="failed"}}' in metrics(agent),
            15,
            "the silent node's purge counted as failed",
        )
    finally:
        agent.stop()
