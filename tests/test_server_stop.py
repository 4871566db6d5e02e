"""Stopping the embedded server while clients keep connecting never breaks its loop.

``Server.stop`` used to close every socket from the stopping thread; when that
landed between the loop's ``select()`` lists and the call, the loop thread died
with EBADF (seen once in a full suite run; 5 of 60 stops in a stress run).
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable

import pytest

from prep_agent.shared.httpserver import Server, ServerLimits

STOPS = 30
"""Servers started and stopped under a stream of connections."""


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


def _hammer(address: str, stop: threading.Event) -> None:
    host, port = address.rsplit(":", 1)
    while not stop.is_set():
        try:
            with socket.create_connection((host, int(port)), timeout=1) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                conn.recv(100)
        except OSError:
            pass


def test_stop_under_connections_leaves_the_loop_thread_clean(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    errors: list[str] = []
    monkeypatch.setattr(
        threading, "excepthook", lambda args: errors.append(f"{args.thread}: {args.exc_value!r}")
    )
    for _ in range(STOPS):
        server = Server("127.0.0.1", 0, _app, limits=ServerLimits(threads=2))
        server.start()
        stop = threading.Event()
        clients = [threading.Thread(target=_hammer, args=(server.address, stop)) for _ in range(4)]
        for client in clients:
            client.start()
        stop.wait(0.05)
        try:
            server.stop()
        finally:
            stop.set()
            for client in clients:
                client.join()
        assert not server._thread.is_alive()
    assert errors == []
