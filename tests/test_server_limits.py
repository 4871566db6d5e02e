"""The embedded server against slow and greedy clients (issue 11, finding 2).

A client that opens many connections and trickles a header line into each every
second or two kept every waitress connection busy: ``/status.json``, ``/`` and
``/health`` stopped answering for as long as the trickle lasted. The server now
closes a connection whose request head is not complete ``[server] header_timeout``
seconds after it began, and refuses a client address's connections beyond
``[server] max_client_connections`` (the trusted proxy excepted).

Real agent processes, real sockets on loopback; clients choose their source
address in 127.0.0.0/8 so the server sees different clients.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from prep_agent.agent.config import load
from prep_agent.core.errors import ConfigError
from tests.kit import AgentDaemon, Institute, free_port, make_config, wait_for

pytestmark = pytest.mark.timeout(90)

HEADER_TIMEOUT = 10.0
"""The default ``[server] header_timeout``, which these tests exercise."""
SLACK = 3.0
"""waitress's loop looks at each connection at least once a second; the rest is load."""
TRICKLERS = 200
ATTACKER, CHECKER, KEEPALIVE, SILENT = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
REQUEST = b"GET /status.json HTTP/1.1\r\nHost: prep.example.mx\r\n\r\n"


@contextlib.contextmanager
def running_agent(tmp: Path, institute: Institute, **settings: object) -> Iterator[AgentDaemon]:
    """A running ``prep-agent run`` on 127.0.0.1 with ``settings``."""
    make_config(tmp, institute, listen=f"127.0.0.1:{free_port()}", **settings)
    daemon = AgentDaemon(tmp / "prep-agent.conf").start()
    try:
        yield daemon
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()


def connect(address: str, source: str, timeout: float = 2.0) -> socket.socket:
    """A TCP connection to ``address`` from ``source``."""
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout, source_address=(source, 0))


def read_response(sock: socket.socket) -> bytes:
    """One whole response (head and Content-Length body); b"" if the server closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed in the middle of a body"
        body += chunk
    return head + b"\r\n\r\n" + body


def ask(sock: socket.socket) -> bytes:
    """Send ``REQUEST`` on ``sock`` and read the response (b"" if the server closed it)."""
    try:
        sock.sendall(REQUEST)
    except (BrokenPipeError, ConnectionResetError):
        return b""
    return read_response(sock)


def status_answers(address: str, source: str, timeout: float = 2.0) -> bool:
    """Whether ``/status.json`` answers 200 within ``timeout`` on a new connection."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout, source_address=(source, 0))
    try:
        conn.request("GET", "/status.json")
        response = conn.getresponse()
        response.read()
        return bool(response.status == 200)
    except OSError:
        return False
    finally:
        conn.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed ``sock`` (a non-blocking socket)."""
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@dataclass
class Trickler:
    """One slowloris connection: a request line, then one header line every 1-2 s."""

    sock: socket.socket
    started: float
    next_line: float
    closed: float | None = None
    lines: int = 0

    def step(self, now: float) -> None:
        if self.closed is not None:
            return
        if closed_by_server(self.sock):
            self.closed = now
            return
        if now < self.next_line:
            return
        try:
            self.sock.send(f"X-Trickle-{self.lines}: 1\r\n".encode())
        except (BrokenPipeError, ConnectionResetError):
            self.closed = now
            return
        self.lines += 1
        self.next_line = now + 1.0 + (self.lines % 3) / 2  # 1, 1.5 or 2 s


@dataclass
class Checks:
    """``/status.json`` from another client every 0.5 s while the trickle lasts."""

    address: str
    stop: threading.Event = field(default_factory=threading.Event)
    results: list[tuple[float, bool]] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            began = time.monotonic()
            ok = status_answers(self.address, CHECKER, timeout=2.0)
            self.results.append((began, ok))


def test_a_trickling_client_does_not_take_the_server_offline(
    tmp_path: Path, institute: Institute
) -> None:
    """200 trickling connections from one address against a server that takes 150.

    Before: every slot held for as long as the trickle lasted (status.json from
    another client timed out) and no trickling connection was ever closed. Now: the
    first 64 (max_client_connections) are read and closed ``header_timeout`` after
    they opened, the others are closed at once, status.json keeps answering, a
    keep-alive client that idles longer than ``header_timeout`` between requests
    keeps its connection, and a connection that never sends a byte is closed too.
    """
    with running_agent(tmp_path, institute, max_connections=150) as agent:
        trickle(agent.config.listen)
        assert f"refusing connections from {ATTACKER}: it holds 64 open" in agent.output()


def trickle(agent: str) -> None:
    """The trickle of the test above against the agent at ``agent``."""
    checks = Checks(agent)
    checker = threading.Thread(target=checks.run, name="checker")
    keepalive = connect(agent, KEEPALIVE, timeout=5)
    assert ask(keepalive).startswith(b"HTTP/1.1 200 ")
    silent = connect(agent, SILENT)
    silent.setblocking(False)
    silent_opened = time.monotonic()
    silent_closed: float | None = None
    tricklers: list[Trickler] = []
    checker.start()
    try:
        for _ in range(TRICKLERS):
            sock = connect(agent, ATTACKER)
            sock.sendall(b"GET /status.json HTTP/1.1\r\n")
            sock.setblocking(False)
            now = time.monotonic()
            tricklers.append(Trickler(sock, now, now + 1.0))
        deadline = time.monotonic() + 2 * HEADER_TIMEOUT + SLACK
        while time.monotonic() < deadline:
            now = time.monotonic()
            for trickler in tricklers:
                trickler.step(now)
            if silent_closed is None and closed_by_server(silent):
                silent_closed = now
            done = all(t.closed is not None for t in tricklers) and silent_closed is not None
            if done and now - silent_opened > HEADER_TIMEOUT + SLACK:
                break
            time.sleep(0.05)
        # Idle between two requests for longer than header_timeout: still served.
        idle = time.monotonic() - silent_opened
        assert idle > HEADER_TIMEOUT + 1, idle
        assert ask(keepalive).startswith(b"HTTP/1.1 200 "), "keep-alive was closed"
    finally:
        checks.stop.set()
        checker.join(timeout=10)
        for t in tricklers:
            t.sock.close()
        silent.close()
        keepalive.close()

    failed = [round(began - silent_opened, 1) for began, ok in checks.results if not ok]
    assert len(checks.results) >= 15 and not failed, f"status.json failed at {failed} s"
    lived = sorted(round(t.closed - t.started, 1) for t in tricklers if t.closed is not None)
    assert len(lived) == TRICKLERS, f"{TRICKLERS - len(lived)} trickling connections still open"
    read = [s for s in lived if s >= 2.0]
    assert len(read) == 64, f"{len(read)} connections were read (max_client_connections 64)"
    assert all(HEADER_TIMEOUT - 0.5 <= s <= HEADER_TIMEOUT + SLACK for s in read), read
    assert silent_closed is not None, "a connection that sent nothing was never closed"
    assert HEADER_TIMEOUT - 0.5 <= silent_closed - silent_opened <= HEADER_TIMEOUT + SLACK


def test_connections_per_client_are_bounded_but_not_for_the_proxy(
    tmp_path: Path, institute: Institute
) -> None:
    """A client holds at most max_client_connections; a closed one frees its place;
    other clients and the trusted proxy (127.0.0.1, nginx's address) are not held back."""
    with running_agent(tmp_path, institute, max_client_connections=4) as agent:
        hold(agent.config.listen)


def hold(agent: str) -> None:
    """The connections of the test above against the agent at ``agent``."""
    held = [connect(agent, ATTACKER) for _ in range(4)]
    extra: list[socket.socket] = []
    try:
        for sock in held:
            assert ask(sock).startswith(b"HTTP/1.1 200 ")
        refused = connect(agent, ATTACKER)
        extra.append(refused)
        assert ask(refused) == b"", "a fifth connection from one address was served"
        assert status_answers(agent, CHECKER)
        proxied = [connect(agent, "127.0.0.1") for _ in range(8)]
        extra += proxied
        for sock in proxied:
            assert ask(sock).startswith(b"HTTP/1.1 200 ")
        for sock in held:  # the four are still open and served
            assert ask(sock).startswith(b"HTTP/1.1 200 ")
        held.pop().close()

        def served_again() -> bool:
            sock = connect(agent, ATTACKER)
            extra.append(sock)
            return ask(sock).startswith(b"HTTP/1.1 200 ")

        wait_for(served_again, 10, "a place freed by a closed connection", interval=0.2)
    finally:
        for sock in held + extra:
            sock.close()


def test_server_settings_are_read_and_checked(tmp_path: Path, institute: Institute) -> None:
    config = make_config(tmp_path, institute)
    assert (config.max_connections, config.max_client_connections) == (1000, 64)
    # A config written before [server] existed (a kept conffile) gets the defaults.
    conf = tmp_path / "prep-agent.conf"
    text = conf.read_text()
    start, end = text.index("[server]"), text.index("[frame]")
    conf.write_text(text[:start] + text[end:])
    old = load(conf)
    assert (old.max_connections, old.max_client_connections) == (1000, 64)
    assert old.header_timeout == 10.0
    assert config.header_timeout == 10.0
    config = make_config(
        tmp_path, institute, max_connections=200, max_client_connections=8, header_timeout=2.5
    )
    assert (config.max_connections, config.max_client_connections) == (200, 8)
    assert config.header_timeout == 2.5
    for key, value, message in (
        ("max_connections", "1001", "[server] max_connections must be at most 1000"),
        ("max_connections", "0", "[server] max_connections must be at least 1"),
        ("max_client_connections", "x", "[server] max_client_connections must be an integer"),
        ("header_timeout", "0", "[server] header_timeout must be positive"),
        ("header_timeout", "soon", "[server] header_timeout must be a number of seconds"),
    ):
        with pytest.raises(ConfigError) as caught:
            make_config(tmp_path, institute, **{key: value})
        assert str(caught.value) == message
