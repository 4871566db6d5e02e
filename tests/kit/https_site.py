"""A hostile institute: an HTTPS server on loopback whose answers a test chooses.

Python's own ``http.server`` (its directory listing is a real autoindex page,
``Last-Modified``/``If-Modified-Since`` are its own) over TLS, with a
certificate from a test CA (``institute/simulation/testca.py``). Routes set per
path answer instead of the folder: a hang, an HTML error page with status 200,
a body cut short, a body trickled slowly. Shared by the fetcher's tests and the
daemon's (``tests/test_https_fetch.py``, ``tests/test_package_publish.py``,
``tests/test_package_faults.py``).
"""

from __future__ import annotations

import functools
import ssl
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

Route = Callable[["SiteHandler"], object]


class SiteServer(ThreadingHTTPServer):
    """The server; ``release`` ends every route that waits (set on ``Site.close``)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up early (refused bodies) are expected here

    routes: dict[str, Route]
    seen: list[tuple[str, dict[str, str]]]
    release: threading.Event


class SiteHandler(SimpleHTTPRequestHandler):
    """Serves the folder, or the route set for the request's path."""

    server: SiteServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers.items())))
        route = self.server.routes.get(self.path)
        if route is not None:
            route(self)
        else:
            super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        """Send a whole answer with a Content-Length."""
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)


class Site:
    """An HTTPS server on 127.0.0.1 serving ``folder``, plus routes of its own."""

    def __init__(self, folder: Path, cert: Path, key: Path, ca_file: Path) -> None:
        self.folder = folder
        self.ca_file = str(ca_file)
        handler = functools.partial(SiteHandler, directory=str(folder))
        self.server = SiteServer(("127.0.0.1", 0), handler)
        self.server.routes, self.server.seen = {}, []
        self.server.release = threading.Event()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.server.server_address[1]}{path}"

    @property
    def routes(self) -> dict[str, Route]:
        return self.server.routes

    @property
    def seen(self) -> list[tuple[str, dict[str, str]]]:
        return self.server.seen

    def close(self) -> None:
        self.server.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def hang(h: SiteHandler) -> None:
    """A route that never answers (until the site closes, at most 60 s)."""
    h.server.release.wait(60)


def cut_short(data: bytes, keep: int) -> Route:
    """A route that announces ``data``'s length and sends only its first ``keep`` bytes."""

    def route(h: SiteHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[:keep])

    return route


def trickle(data: bytes, chunk: int, pause: float, sent: list[int] | None = None) -> Route:
    """A route that sends ``data`` (with its length) ``chunk`` bytes every ``pause``
    seconds, counting the bytes sent into ``sent[0]``; it stops when the client
    hangs up or the site closes."""

    def route(h: SiteHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("Content-Type", "application/zip")
        h.end_headers()
        for start in range(0, len(data), chunk):
            if start and h.server.release.wait(pause):
                return
            try:
                h.wfile.write(data[start : start + chunk])
                h.wfile.flush()
            except OSError:
                return
            if sent is not None:
                sent[0] = start + len(data[start : start + chunk])

    return route
