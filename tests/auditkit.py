"""A hostile front for audit tests: a real HTTP server in front of a real difusor.

``Front`` listens on 127.0.0.1 and passes every GET to the difusor behind it
(the agent's embedded server or nginx), byte for byte, except for the paths it
was told to spoil: answer 200 with an HTML error page, answer slowly, or send
an endless body. What it sent of an endless body is counted, so a test can
check that the auditor stopped reading. Spoiled answers carry the difusor's
``Access-Control-Allow-Origin: *`` too, so the verifier page in a browser
reads them as the CLI does (without it, the browser hides the answer).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prep_agent.core.protocol import CACHE_FRAME

HTML_ERROR = "html-error"
"""Answer 200 text/html with a proxy's error page."""
SLOW = "slow"
"""Send the headers and one byte, then nothing until the front stops."""
ENDLESS = "endless"
"""Answer 200 with no Content-Length and bytes until the client goes away."""
HUGE = "huge"
"""Answer 200 announcing a 10 GB Content-Length."""
TRICKLE = "trickle"
"""Answer 200 with no Content-Length and one byte every 0.2 s until the front stops."""

NO_CACHE = "no-cache"
"""Pass the answer on with ``Cache-Control: no-cache`` in place of the difusor's."""

ERROR_PAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>\n"
_HOP = {"connection", "keep-alive", "transfer-encoding"}
_CORS = ("Access-Control-Allow-Origin", "*")


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def do_GET(self) -> None:
        front = self.server.front
        spoil = front.spoiled.get(self.path)
        if spoil is None:
            spoil = next((v for k, v in front.endings.items() if self.path.endswith(k)), None)
        with front.lock:
            once = front.once.pop(self.path, None)
        if once is not None:  # a pointer as the difusor served it a moment ago
            pointer = [("Content-Type", "application/json"), ("Cache-Control", CACHE_FRAME)]
            self._send(200, [*pointer, _CORS], once)
        elif self.path in front.bodies:
            body = front.bodies[self.path]
            self._send(200, [("Content-Type", "application/json"), _CORS], body)
        elif spoil is None or spoil == NO_CACHE:
            self._pass(spoil == NO_CACHE)
        elif spoil == HTML_ERROR:
            self._send(200, [("Content-Type", "text/html"), _CORS], ERROR_PAGE)
        elif spoil == SLOW:
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"{")
            self.wfile.flush()
            self.server.front.stopping.wait(30)
        elif spoil == TRICKLE:
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Connection", "close")
            self.end_headers()
            self._trickle()
        elif spoil == HUGE:
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Content-Length", str(10 * 1000**3))
            self.end_headers()
            self._endless()
        else:
            self.send_response(200)
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Connection", "close")
            self.end_headers()
            self._endless()
        self.close_connection = True

    def _endless(self) -> None:
        chunk = b"x" * 65536
        try:
            for _ in range(16384):  # at most 1 GiB, and only if nobody stops reading
                if self.server.front.stopping.is_set():
                    return
                self.wfile.write(chunk)
                with self.server.front.lock:
                    self.server.front.sent += len(chunk)
        except OSError:
            return

    def _trickle(self) -> None:
        try:
            for _ in range(600):  # two minutes at most
                self.wfile.write(b" ")
                self.wfile.flush()
                if self.server.front.stopping.wait(0.2):
                    return
        except OSError:
            return

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _pass(self, no_cache: bool) -> None:
        back = self.server.front.backend
        conn = http.client.HTTPConnection(back.hostname, back.port, timeout=10)
        try:
            conn.request("GET", self.path, headers={"Accept-Encoding": "identity"})
            answer = conn.getresponse()
            body = answer.read()
            headers = [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP]
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            if no_cache:
                headers = [(k, v) for k, v in headers if k.lower() != "cache-control"]
                headers.append(("Cache-Control", "no-cache"))
            self._send(answer.status, headers, body)
        finally:
            conn.close()


class _Server(ThreadingHTTPServer):
    # socketserver's backlog of 5 drops the SYNs of an auditor opening 8
    # connections at once; a retransmitted SYN costs 1 s, a whole --timeout 1.
    request_queue_size = 64
    daemon_threads = False
    block_on_close = True
    front: Front


class Front:
    """The front on 127.0.0.1 (any free port) for the difusor at ``backend``."""

    def __init__(self, backend: str) -> None:
        self.backend = urlsplit(backend)
        self.spoiled: dict[str, str] = {}
        """Request path (as sent, percent-encoded) -> HTML_ERROR, SLOW, TRICKLE, ENDLESS,
        HUGE, NO_CACHE."""
        self.bodies: dict[str, bytes] = {}
        """Request path -> a body answered with 200 in place of the difusor's."""
        self.once: dict[str, bytes] = {}
        """Like ``bodies``, answered for the first request of the path only."""
        self.endings: dict[str, str] = {}
        """Like ``spoiled``, for every path ending so (``.csv``: every CSV)."""
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.sent = 0
        """Bytes of endless bodies written so far."""
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.front = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="front")

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> Front:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
