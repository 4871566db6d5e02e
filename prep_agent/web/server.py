"""The embedded web server: the frame, ``status.json``, the releases, and health.

Hot paths (frame, status, release files) are served by a small WSGI layer
straight from disk; everything else (``/health``, ``/livez``, ``/readyz``,
``/metrics``) goes to the Flask application of ``health``. It runs on
waitress, a production WSGI server (``shared.httpserver``); nginx can serve the same files from disk
instead (``packaging/nginx``), proxying only the health paths.
"""

from __future__ import annotations

import mimetypes
import os
import stat
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, Callable

from prep_agent.agent.config import Config
from prep_agent.core.protocol import CACHE_FRAME, CACHE_RELEASE
from prep_agent.shared.fsutil import atomic_write
from prep_agent.shared.httpserver import (
    Server,
    ServerLimits,
    WSGIApp,
    loopback_for,
    parse_listen,
)
from prep_agent.web.frame import RELEASES_URL
from prep_agent.web.health import Metrics, Snapshot, create_app
from prep_agent.web.purge import POINTER_TAG, RELEASE_TAG, STATIC_TAG, tag_headers

IMMUTABLE = CACHE_RELEASE
"""Cache-Control of release files: a release URL never changes content."""
SHORT = CACHE_FRAME
"""Cache-Control of the frame and status.json: a CDN refreshes them every few seconds
and keeps serving the last copy if the origin fails (the page still turns stale
by the server clock)."""
ASSETS = "public, max-age=300, stale-while-revalidate=60, stale-if-error=86400"
"""Cache-Control of the frame's own script, style and logo."""

CORS_ORIGIN = "*"
"""Access-Control-Allow-Origin of the public files (never the health paths): any page,
the institute's verifier among them, may read them with a plain GET (no credentials,
no preflight; any other method is still 405)."""

SMALL_FILE = 256 * 1024
"""Files up to this size are answered from one read: waitress's file wrapper costs
about ten times more per response for small files (measured with wrk)."""

_TEXT_TYPES = ("text/", "application/json", "application/javascript", "image/svg+xml")


def frame_csp(config: Config) -> str:
    """Content-Security-Policy of the frame page."""
    ancestors = " ".join(config.frame_ancestors)
    return (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "frame-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
        f"form-action 'none'; frame-ancestors {ancestors}"
    )


def content_csp(config: Config) -> str:
    """Content-Security-Policy of the institute's files: only where they may be embedded."""
    ancestors = " ".join(dict.fromkeys(("'self'", *config.frame_ancestors)))
    return f"frame-ancestors {ancestors}"


def nginx_snippets(config: Config) -> dict[str, str]:
    """nginx ``add_header`` includes with the same security headers as ``PublicApp``.

    Written into ``ROOT/nginx/`` at start so the packaged site
    (``packaging/nginx``) follows the agent's config; reload nginx after a change.
    """
    common = (
        'add_header X-Content-Type-Options "nosniff" always;\n'
        'add_header Referrer-Policy "strict-origin-when-cross-origin" always;\n'
        f'add_header Access-Control-Allow-Origin "{CORS_ORIGIN}" always;\n'
    )
    header = "# Written by prep-agent from its config; do not edit.\n"
    return {
        "frame-headers.conf": f"{header}add_header Content-Security-Policy "
        f'"{frame_csp(config)}" always;\n{common}',
        "content-headers.conf": f"{header}add_header Content-Security-Policy "
        f'"{content_csp(config)}" always;\n{common}',
    }


def write_nginx_snippets(config: Config) -> None:
    """Write ``nginx_snippets`` into ``ROOT/nginx/`` (atomically)."""
    folder = config.layout.nginx
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in nginx_snippets(config).items():
        atomic_write(folder / name, text.encode())


def content_type(path: str) -> str:
    """MIME type by extension, UTF-8 for text."""
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return f"{mime}; charset=utf-8" if mime.startswith(_TEXT_TYPES) else mime


def request_path(environ: dict[str, Any]) -> str | None:
    """The request's path as text, or None if it is not UTF-8.

    The WSGI server has already percent-decoded the path and handed over its bytes
    as latin-1 text (PEP 3333), so they are re-encoded and read as UTF-8, strictly,
    and never unquoted again: ``Torre%C3%B3n.txt`` is ``Torreón.txt``, and
    ``a%2541.txt`` is the file ``a%41.txt`` (nginx reads URLs the same way).
    """
    raw = environ.get("PATH_INFO", "/")
    try:
        return str(raw.encode("latin-1").decode("utf-8"))
    except UnicodeError:
        return None


def safe_relative(path: str) -> str | None:
    """A URL path below a folder, as ``request_path`` decoded it (never decoded
    again), or None if it could escape the folder."""
    parts = path.split("/")
    if "\0" in path or "\\" in path or any(p in ("..", ".") for p in parts):
        return None
    return "/".join(p for p in parts if p)


class PublicApp:
    """WSGI application serving the public files; other paths go to ``fallback``."""

    def __init__(self, config: Config, fallback: WSGIApp) -> None:
        self.config = config
        self.fallback = fallback
        self.frame_headers = [
            ("Content-Security-Policy", frame_csp(config)),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "strict-origin-when-cross-origin"),
            ("Access-Control-Allow-Origin", CORS_ORIGIN),
        ]
        self.cache = FileCache()
        self.content_headers = [
            ("Content-Security-Policy", content_csp(config)),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "strict-origin-when-cross-origin"),
            ("Access-Control-Allow-Origin", CORS_ORIGIN),
        ]
        # Tag headers (web.purge): a cache in front purges the pointers by tag.
        self.pointer_headers = self.frame_headers + tag_headers(POINTER_TAG)
        self.static_headers = self.frame_headers + tag_headers(STATIC_TAG)
        self.release_headers = self.content_headers + tag_headers(RELEASE_TAG)

    def route(self, path: str) -> tuple[Path, str, list[tuple[str, str]]] | None:
        """The file, Cache-Control and security headers for a URL path, or None."""
        public = self.config.public
        if path in ("/", "/index.html"):
            return public / "index.html", SHORT, self.pointer_headers
        if path == "/status.json":
            return public / "status.json", SHORT, self.pointer_headers
        if path.startswith("/static/"):
            rel = safe_relative(path[len("/static/") :])
            return (public / "static" / rel, ASSETS, self.static_headers) if rel else None
        prefix = f"/{RELEASES_URL}/"
        if path.startswith(prefix):
            rel = safe_relative(path[len(prefix) :])
            if not rel or ("/" not in rel and not path.endswith("/")):
                return None
            target = self.config.releases / rel
            if path.endswith("/"):
                target = target / "index.html"
            return target, IMMUTABLE, self.release_headers
        return None

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        path = request_path(environ)
        if path is None:  # no file has a name that is not UTF-8
            return _not_found(start_response)
        routed = self.route(path)
        if routed is None:
            if path.startswith(("/static/", f"/{RELEASES_URL}/")) or path in ("/", "/status.json"):
                return _not_found(start_response, cors=True)
            return self.fallback(environ, start_response)
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")]
            )
            return [b""]
        file, cache, security = routed
        return self.cache.send(environ, start_response, file, cache, security)


def _not_found(start_response: Callable[..., Any], cors: bool = False) -> Iterable[bytes]:
    """404; ``cors`` on a public path, so a verifier page can tell "missing" from "blocked"."""
    body = b"No encontrado\n"
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ]
    start_response(
        "404 Not Found", headers + ([("Access-Control-Allow-Origin", CORS_ORIGIN)] if cors else [])
    )
    return [body]


@dataclass
class _Cached:
    """A small file held in memory with what identifies its version on disk."""

    version: tuple[int, int, int]
    body: bytes
    headers: list[tuple[str, str]]
    etag: str
    checked: float


class FileCache:
    """Serves files from disk, keeping small ones in memory.

    Opening and reading a file in a waitress worker thread on every request cut
    the throughput about five times under load (measured with wrk: 650 vs 3,400
    req/s). Every kept file is re-checked (one ``lstat``) at most every
    ``recheck`` seconds: a new cut's frame and status.json show within that time,
    and a release file changed on disk (which should never happen) is served as
    it is on disk, as nginx does, so an audit of the public copy sees it.
    """

    def __init__(self, max_bytes: int = 64 * 1024**2, recheck: float = 0.5) -> None:
        self.max_bytes = max_bytes
        self.recheck = recheck
        self.size = 0
        self._files: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def send(
        self,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        path: Path,
        cache: str,
        security: list[tuple[str, str]],
    ) -> Iterable[bytes]:
        """Answer GET/HEAD for ``path`` (404 if absent or not a regular file)."""
        key = str(path)
        entry = self._files.get(key)
        now = time.monotonic()
        if entry is not None and now - entry.checked > self.recheck:
            entry = self._revalidate(key, entry, now)
        if entry is None:
            return self._from_disk(environ, start_response, path, cache, security)
        return _answer(environ, start_response, entry.headers, entry.etag, entry.body)

    def _revalidate(self, key: str, entry: _Cached, now: float) -> _Cached | None:
        try:
            st = os.lstat(key)
        except OSError:
            return None
        if (st.st_ino, st.st_size, st.st_mtime_ns) != entry.version:
            return None
        entry.checked = now
        return entry

    def _from_disk(
        self,
        environ: dict[str, Any],
        start_response: Callable[..., Any],
        path: Path,
        cache: str,
        security: list[tuple[str, str]],
    ) -> Iterable[bytes]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return _not_found(start_response, cors=True)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return _not_found(start_response, cors=True)
        etag = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'
        headers = [
            ("Content-Type", content_type(path.name)),
            ("Cache-Control", cache),
            ("ETag", etag),
            ("Last-Modified", formatdate(st.st_mtime, usegmt=True)),
            ("Content-Length", str(st.st_size)),
            *security,
        ]
        fh = os.fdopen(fd, "rb")
        wrapper = environ.get("wsgi.file_wrapper")
        if st.st_size > SMALL_FILE and wrapper is not None:
            if environ.get("HTTP_IF_NONE_MATCH") == etag or _is_head(environ):
                fh.close()
                return _answer(environ, start_response, headers, etag, b"")
            start_response("200 OK", headers)
            return wrapper(fh, 256 * 1024)  # type: ignore[no-any-return]
        with fh:
            body = fh.read(st.st_size)
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._keep(str(path), _Cached(version, body, headers, etag, time.monotonic()))
        return _answer(environ, start_response, headers, etag, body)

    def _keep(self, key: str, entry: _Cached) -> None:
        with self._lock:
            old = self._files.pop(key, None)
            self.size -= len(old.body) if old else 0
            while self._files and self.size + len(entry.body) > self.max_bytes:
                evicted = self._files.pop(next(iter(self._files)))
                self.size -= len(evicted.body)
            self._files[key] = entry
            self.size += len(entry.body)


def _is_head(environ: dict[str, Any]) -> bool:
    return environ.get("REQUEST_METHOD") == "HEAD"


def _answer(
    environ: dict[str, Any],
    start_response: Callable[..., Any],
    headers: list[tuple[str, str]],
    etag: str,
    body: bytes,
) -> Iterable[bytes]:
    """200 with ``body``, or 304 when the client holds version ``etag``, or a HEAD answer."""
    if environ.get("HTTP_IF_NONE_MATCH") == etag:
        start_response("304 Not Modified", [h for h in headers if h[0] != "Content-Length"])
        return [b""]
    start_response("200 OK", headers)
    return [b""] if _is_head(environ) else [body]


def trusted_proxy(config: Config) -> str | None:
    """The address whose X-Forwarded-For names the client (None: nobody's).

    ``[server] trusted_proxy``, else the loopback address of ``listen``'s family:
    a reverse proxy on this host (the packaged nginx) connects to ``[::1]:8080``
    from ::1, never from 127.0.0.1, and a proxy that is not trusted would make
    every client look like the proxy, an allowed address. Raises ``ConfigError``
    if ``listen`` is malformed.
    """
    if config.trusted_proxy == "none":
        return None
    if config.trusted_proxy:
        return config.trusted_proxy
    return loopback_for(parse_listen(config.listen)[0])


def make_server(config: Config, app: WSGIApp, threads: int = 8) -> Server:
    """The shared waitress server for ``app`` on the configured ``listen`` address.

    Raises ``ConfigError`` if the address is malformed or cannot be listened on.
    """
    host, port = parse_listen(config.listen)
    limits = ServerLimits(
        threads=threads,
        connection_limit=config.max_connections,
        client_limit=config.max_client_connections,
        header_timeout=config.header_timeout,
    )
    return Server(host, port, app, limits, trusted_proxy=trusted_proxy(config))


def build_app(config: Config, snapshot: Callable[[bool], Snapshot], metrics: Metrics) -> PublicApp:
    """The whole application: public files first, then health (``snapshot(full)``)."""
    health = create_app(snapshot, metrics, config.health_token, config.health_allow)
    return PublicApp(config, health.wsgi_app)
