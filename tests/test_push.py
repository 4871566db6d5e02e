"""The difusor's side of health-v1 §3: key, signed pushes, and a silent institute.

Agents run as real ``prep-agent run`` processes; the institute is a real HTTP
server in the test, or a raw socket that accepts and never answers.
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from prep_agent.core import sshkeys, sshsig
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.web.push import backoff_delay, signed_report
from tests.collectorkit import deliver_cut, journal_time, keygen, make_difusor
from tests.kit import PREP_AGENT, Institute, wait_for


class Receiver:
    """An institute endpoint that records every POST and answers 202."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, bytes, str | None]] = []
        received = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((time.time(), body, self.headers.get("PREP-Signature")))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/reports"
        self.thread = threading.Thread(target=self.server.serve_forever)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def docs(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body, _ in self.posts]


class Silent:
    """An institute endpoint that accepts TCP connections and never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/reports"
        self.accepted: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.accepted.append(conn)  # and never read or answer

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_keygen_line_verifies_with_openssh(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "report_key"
    line = keygen(key, "diario-x")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert line.startswith('diario-x namespaces="prep-health" ssh-ed25519 ')
    pub = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True)
    assert pub.returncode == 0 and pub.stdout.split()[:2] == line.split()[2:4]
    again = subprocess.run(
        [PREP_AGENT, "keygen", "--key", str(key), "--service-id", "diario-x"],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 2 and "exists" in again.stderr

    private = sshkeys.load_private_key(key.read_bytes())
    now = datetime.now(timezone.utc)
    body, header, _ = signed_report({"serviceId": "diario-x", "status": "pass"}, private, None, now)
    (tmp_path / "allowed").write_text(line + "\n")
    (tmp_path / "sig").write_bytes(sshsig.armor(base64.b64decode(header)))
    verify_cmd = ["ssh-keygen", "-Y", "verify", "-f", str(tmp_path / "allowed"), "-I", "diario-x"]
    verify = subprocess.run(
        [*verify_cmd, "-n", "prep-health", "-s", str(tmp_path / "sig")],
        input=body,
        capture_output=True,
    )
    assert verify.returncode == 0, verify.stderr
    wrong_ns = subprocess.run(
        [*verify_cmd, "-n", "prep-cut", "-s", str(tmp_path / "sig")],
        input=body,
        capture_output=True,
    )
    assert wrong_ns.returncode != 0


@pytest.mark.core
def test_report_times_strictly_increase() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    now = datetime(2021, 6, 6, 20, 30, tzinfo=timezone.utc)
    _, _, first = signed_report({"serviceId": "d"}, key, None, now)
    body, _, second = signed_report({"serviceId": "d"}, key, first, now)
    assert second > first
    assert json.loads(body)["time"] == "2021-06-06T20:30:00.001+00:00"


@pytest.mark.core
def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(7)
    for failures, step in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (40, 60.0)):
        delays = [backoff_delay(failures, 60.0, rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays), (failures, min(delays), max(delays))
        assert len({round(d, 6) for d in delays}) > 150  # jittered, not lockstep


def test_push_at_start_after_publication_and_rejection(tmp_path: Path, receiver: Receiver) -> None:
    inst = Institute(tmp_path / "inst")
    agent, line = make_difusor(tmp_path, inst, "diario-p", receiver.url, period_seconds=60)
    signers = parse_allowed_signers(line + "\n")
    manifests = tmp_path / "salida"
    agent.start()
    try:
        wait_for(lambda: len(receiver.posts) == 1, what="report at start")
        deliver_cut(inst, [agent.config.inbox], manifests, 1)
        wait_for(lambda: len(receiver.posts) == 2, what="report after publication")
        published = journal_time(agent.journal("cut-published")[-1])
        assert receiver.posts[1][0] - published < 1.0  # not after the 60 s period
        when = datetime.now(timezone.utc)
        files = inst.files(when, 2)
        doc = inst.manifest(files, 2, when, election="otra-eleccion")
        inst.deliver(agent.config.inbox, files, doc)
        wait_for(lambda: len(receiver.posts) == 3, what="report after rejection")
        health = requests.get(
            agent.url + "/health", headers={"Authorization": f"Bearer {agent.token}"}, timeout=5
        ).json()
    finally:
        agent.stop()
    docs = receiver.docs()
    assert [d["checks"]["cut:sequence"][0]["observedValue"] for d in docs] == [None, 1, 1]
    last_rejection = docs[2]["checks"]["cut:last-rejection"][0]["observedValue"]
    assert last_rejection.startswith("wrong-election")
    assert "disk:utilization" in docs[0]["checks"] and docs[0]["serviceId"] == "diario-p"
    times = [datetime.fromisoformat(d["time"]) for d in docs]
    assert times == sorted(times) and len(set(times)) == 3
    for _, body, header in receiver.posts:
        assert header is not None
        sig = sshsig.parse_blob(base64.b64decode(header))
        signer, why = sshsig.check_signature(sig, body, signers, "prep-health", times[-1])
        assert signer is not None, why
    delivery = health["checks"]["report:delivery"][0]
    assert delivery["status"] == "pass" and 0 <= delivery["observedValue"] < 60


def test_silent_institute_never_delays_publication(tmp_path: Path) -> None:
    silent = Silent()
    inst = Institute(tmp_path / "inst")
    agent, _ = make_difusor(tmp_path, inst, "diario-s", silent.url)
    manifests = tmp_path / "salida"
    delivered: dict[int, float] = {}
    try:
        agent.start()
        for sequence in range(1, 9):
            delivered[sequence] = deliver_cut(inst, [agent.config.inbox], manifests, sequence)
            wait_for(lambda s=sequence: agent.published(s), timeout=10)
            time.sleep(0.6)
        health = requests.get(
            agent.url + "/health", headers={"Authorization": f"Bearer {agent.token}"}, timeout=5
        ).json()
    finally:
        agent.stop()
        silent.close()
    events = {e["sequence"]: e for e in agent.journal("cut-published")}
    lags = [journal_time(events[s]) - at for s, at in delivered.items()]
    print(f"\nsilent institute: delivery->published max {max(lags) * 1000:.0f} ms")
    assert max(lags) < 1.0, lags
    assert all(events[s]["total_ms"] < 1000 for s in delivered)
    # Pushes really were hanging on the silent endpoint meanwhile (read timeout 2 s).
    assert len(silent.accepted) >= 2
    failing = agent.journal("report-failing")
    assert len(failing) == 1 and "ReadTimeout" in failing[0]["detail"], failing
    delivery = health["checks"]["report:delivery"][0]
    assert delivery["status"] == "warn" and delivery["observedValue"] is None
