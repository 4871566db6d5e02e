"""The collector's poll of a difusor's /health is bounded in bytes and in time.

A registered difusor answers the collector's GET; a hostile or broken one may
send a body of gigabytes or trickle it a byte at a time, each byte well within
the per-read timeout. Each test runs a real loopback HTTP (or HTTPS) server in
a thread that scripts its answer and counts what it managed to send, and polls
it with the collector's own ``poll_one``.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from prep_agent.institute.collector.app import Collector
from prep_agent.institute.collector.config import CollectorConfig, DifusorEntry
from prep_agent.institute.collector.verify import MAX_REPORT_BYTES

CONNECT_TIMEOUT = 1.0
READ_TIMEOUT = 2.0
DEADLINE = CONNECT_TIMEOUT + READ_TIMEOUT
"""The whole poll must end within this (the collector's documented bound)."""
HUGE = 50 * 1024**2
"""Bytes the huge answer declares and tries to send."""
TRICKLE_EVERY = 0.25
"""Seconds between two trickled bytes: far below READ_TIMEOUT."""
TRICKLE_FOR = 15.0
"""Seconds a trickling server keeps going if the client does not hang up."""
SID = "diario-a"


class Server:
    """A loopback server that reads one request per connection and runs ``answer``."""

    def __init__(
        self, answer: Callable[[Server, socket.socket], None], tls: ssl.SSLContext | None = None
    ) -> None:
        self.answer = answer
        self.tls = tls
        self.sent = 0
        self.finished = False
        self.hung_up = False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, name="scripted-http")
        self.thread.start()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}/health"

    def loop(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            try:
                conn.settimeout(10)
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    data = conn.recv(4096)
                    if not data:
                        break
                    request += data
                self.answer(self, conn)
            except OSError:
                self.hung_up = True  # the client hung up (reset, broken pipe)
            finally:
                conn.close()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.sock.close()


def huge(server: Server, conn: socket.socket) -> None:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {HUGE}\r\n\r\n"
    server.send(conn, head.encode())
    chunk = b" " * 65536
    end = time.monotonic() + 30
    while server.sent < HUGE and time.monotonic() < end:
        server.send(conn, chunk)
    server.finished = True


def trickle(server: Server, conn: socket.socket, head: bytes) -> None:
    server.send(conn, head)
    end = time.monotonic() + TRICKLE_FOR
    while time.monotonic() < end:
        server.send(conn, b"a")
        time.sleep(TRICKLE_EVERY)
    server.finished = True


def trickle_body(server: Server, conn: socket.socket) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    trickle(server, conn, head)


def trickle_headers(server: Server, conn: socket.socket) -> None:
    trickle(server, conn, b"HTTP/1.1 200 OK\r\nX-Lento: ")


def health(server: Server, conn: socket.socket) -> None:
    now = datetime.now(timezone.utc).isoformat()
    body = json.dumps({"serviceId": SID, "time": now, "status": "pass"}).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    server.send(conn, head.encode() + b"\r\n\r\n" + body)
    server.finished = True


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    (tmp_path / "allowed_signers").write_text("")
    config = CollectorConfig(
        trust=tmp_path / "allowed_signers",
        database=tmp_path / "collector.sqlite",
        difusores=(DifusorEntry(SID, "Diario A"),),
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
    )
    c = Collector(config)
    yield c
    c.store.close()


def poll(collector: Collector, url: str) -> tuple[float, str | None, str | None]:
    """Poll once; return the seconds it took, the poll error and the source recorded."""
    start = time.monotonic()
    collector.poll_one(SID, url, None)
    took = time.monotonic() - start
    (record,) = collector.store.difusores()
    return took, record.poll_error, record.last_source


class PeakRss:
    """The highest resident set size of this process while in the ``with`` block."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, name="rss-sampler")

    def sample(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()


def test_huge_body_is_cut_at_the_cap(collector: Collector) -> None:
    server = Server(huge)
    try:
        with PeakRss() as rss:
            took, error, source = poll(collector, server.url())
        deadline = time.monotonic() + 10
        while not (server.hung_up or server.finished) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.close()
    grew = (rss.peak - rss.base) / 1024**2
    sent = server.sent / 1024**2
    print(f"huge body: {took:.2f} s, server sent {sent:.1f} MiB, RSS +{grew:.1f} MiB")
    assert error == f"body over {MAX_REPORT_BYTES} bytes" and source is None
    assert server.hung_up and not server.finished
    assert server.sent < HUGE / 4  # what the kernel buffers held when the collector hung up
    assert grew < 16, grew


@pytest.mark.parametrize("answer", [trickle_body, trickle_headers], ids=["body", "headers"])
def test_trickle_is_cut_at_the_deadline(
    collector: Collector, answer: Callable[[Server, socket.socket], None]
) -> None:
    server = Server(answer)
    try:
        took, error, _ = poll(collector, server.url())
    finally:
        server.close()
    print(f"trickle ({answer.__name__}): poll ended after {took:.2f} s")
    assert error == "timeout"
    assert DEADLINE - 0.5 < took < DEADLINE + 1.5, took
    assert not server.finished


def _tls(tmp_path: Path) -> tuple[ssl.SSLContext, Path]:
    """A server context with a self-signed certificate for 127.0.0.1, and its file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file


def test_https_polls_work_and_a_trickle_is_cut_at_the_deadline(
    collector: Collector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context, cert = _tls(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))  # how an institute trusts a private CA
    server = Server(health, context)
    try:
        _, error, source = poll(collector, server.url("https"))
    finally:
        server.close()
    assert (error, source) == (None, "poll")

    server = Server(trickle_body, context)
    try:
        took, error, _ = poll(collector, server.url("https"))
    finally:
        server.close()
    print(f"https trickle: poll ended after {took:.2f} s")
    assert error == "timeout" and DEADLINE - 0.5 < took < DEADLINE + 1.5, took
