"""GETs of a difusor's public files for the audit, bounded in time and in bytes.

The difusor under audit may be broken or hostile: it may trickle a byte at a
time, send gigabytes, or answer 200 with an error page. Every GET has one
deadline for the whole exchange (connect, headers, body): a watchdog thread
shuts the socket down when it passes, so a read blocked on it returns at once;
a body that "ends" that way (no Content-Length) timed out, it is not the answer.
The body is read up to a limit the caller gives (a listed file's signed size
plus one byte: enough to see it is too long) and hashed as it arrives, so
memory stays bounded whatever the file.

Each worker thread keeps one keep-alive connection (``http.client``, no proxy):
an audit of thousands of small files costs one TCP handshake per thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from prep_agent.core.errors import ConfigError, Error

CHUNK = 64 * 1024
"""Bytes asked of the body per read."""
TIMEOUT = "timeout"
"""What a GET that did not end in time got."""
_RETRYABLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
"""A kept-alive connection the server closed meanwhile: the GET is sent again once."""


class FetchError(Error):
    """A GET failed; the message is what the audit reports as got (one line).

    ``altered``: the answer came but is not what was asked (too long, compressed),
    as opposed to no answer (timeout, connection failure).
    """

    def __init__(self, message: str, altered: bool = False) -> None:
        super().__init__(message)
        self.altered = altered


@dataclass(frozen=True)
class Fetched:
    """One answer: status, headers (lower-case names), body size and SHA-256.

    ``body`` holds the bytes only when the caller asked to keep them.
    """

    status: int
    headers: dict[str, str]
    size: int
    sha256: str
    body: bytes = b""


@dataclass
class _Watched:
    deadline: float
    sock: socket.socket
    expired: bool = False


@dataclass
class _Watchdog:
    """Shuts down each watched socket once its deadline has passed."""

    interval: float = 0.05
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _watched: dict[int, _Watched] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> _Watched:
        entry = _Watched(deadline, sock)
        with self._lock:
            self._watched[id(entry)] = entry
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="audit-watchdog")
                self._thread.daemon = True
                self._thread.start()
        return entry

    def forget(self, entry: _Watched) -> None:
        with self._lock:
            self._watched.pop(id(entry), None)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            with self._lock:
                due = [e for e in self._watched.values() if e.deadline <= now and not e.expired]
                for entry in due:
                    entry.expired = True
            for entry in due:
                with contextlib.suppress(OSError):  # already closed by its thread
                    entry.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class Fetcher:
    """GETs of paths below one base URL (``http://`` or ``https://``).

    ``timeout`` bounds each GET as a whole. Thread-safe: each thread uses its
    own connection. ``close`` ends the connections and the watchdog.
    """

    def __init__(self, base_url: str, timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"not an http(s) URL: {base_url!r}")
        if parts.query or parts.fragment:
            raise ConfigError(f"the difusor's URL has no query or fragment: {base_url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        try:
            self.port = parts.port
        except ValueError:
            raise ConfigError(f"bad port in {base_url!r}") from None
        self.base_path = parts.path if parts.path.endswith("/") else parts.path + "/"
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []
        self._watchdog = _Watchdog()
        self._tls = ssl.create_default_context() if self.scheme == "https" else None

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` (relative, not yet quoted)."""
        netloc = self.host if self.port is None else f"{self.host}:{self.port}"
        return f"{self.scheme}://{netloc}{self.target(path)}"

    def target(self, path: str) -> str:
        """The request target of ``path``: the base path, then ``path`` percent-encoded."""
        return self.base_path + quote(path)

    def get(self, path: str, max_bytes: int, keep: bool = False) -> Fetched:
        """GET ``path`` (identity encoding) reading at most ``max_bytes + 1`` body bytes.

        A body longer than ``max_bytes`` (by its Content-Length or as it
        arrives) raises. Raises ``FetchError``: timeout, connection failure,
        body over the limit, a compressed body.
        """
        deadline = time.monotonic() + self.timeout
        conn, reused = self._connection()
        try:
            return self._exchange(conn, path, max_bytes, keep, deadline)
        except _RETRYABLE:
            self._drop(conn)
            if not reused or time.monotonic() >= deadline:
                raise FetchError("connection closed by the server") from None
        except BaseException:
            self._drop(conn)
            raise
        conn, _ = self._connection()
        try:
            return self._exchange(conn, path, max_bytes, keep, deadline)
        except BaseException:
            self._drop(conn)
            raise

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        path: str,
        max_bytes: int,
        keep: bool,
        deadline: float,
    ) -> Fetched:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(TIMEOUT)
        conn.timeout = remaining
        watched: _Watched | None = None
        try:
            if conn.sock is None:
                conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(remaining)
            watched = self._watchdog.watch(conn.sock, deadline)
            conn.request("GET", self.target(path), headers={"Accept-Encoding": "identity"})
            response = conn.getresponse()
            fetched = _read(response, max_bytes, keep)
            if watched.expired:  # the watchdog's shutdown ended the body, not the server
                raise FetchError(TIMEOUT)
            if response.will_close or fetched.status != 200:
                self._drop(conn)
            return fetched
        except _RETRYABLE:
            if watched is not None and watched.expired:
                raise FetchError(TIMEOUT) from None
            raise
        except (OSError, http.client.HTTPException) as exc:
            expired = (watched is not None and watched.expired) or isinstance(exc, socket.timeout)
            raise FetchError(TIMEOUT if expired else _describe(exc)) from None
        finally:
            if watched is not None:
                self._watchdog.forget(watched)
                if watched.expired:
                    self._drop(conn)

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.sock is not None:
            return conn, True
        if self._tls is not None:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self._tls
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        self._local.conn = conn
        with self._lock:
            self._connections.append(conn)
        return conn, False

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None

    def close(self) -> None:
        """Close every connection and stop the watchdog."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._watchdog.close()


def _read(response: http.client.HTTPResponse, max_bytes: int, keep: bool) -> Fetched:
    """The body, hashed, or ``FetchError`` past ``max_bytes`` or when compressed."""
    headers = {name.lower(): value for name, value in response.getheaders()}
    if response.status != 200:  # its body is not read: the connection is dropped
        return Fetched(response.status, headers, 0, "")
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise FetchError(f"a {encoding[:40]} body although identity was asked", True)
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError(f"{int(declared)} bytes (Content-Length)", True)
    digest = hashlib.sha256()
    kept = bytearray()
    size = 0
    while size <= max_bytes:
        chunk = response.read(min(CHUNK, max_bytes + 1 - size))
        if not chunk:
            break
        size += len(chunk)
        digest.update(chunk)
        if keep:
            kept += chunk
    if size > max_bytes:
        raise FetchError(f"more than {max_bytes} bytes", True)
    return Fetched(response.status, headers, size, digest.hexdigest(), bytes(kept))


def _describe(exc: BaseException) -> str:
    """One line for a failed GET."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
