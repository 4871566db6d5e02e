"""waitress, the production WSGI server both the agent and the collector run on.

Plain arguments only (address, application, limits): each side builds its own
application and decides what to trust.

waitress bounds open connections in all and idle ones in time, but not the time a
client takes to send its request, nor how many connections one client holds: a
thousand connections trickling a header line every few seconds kept every
connection slot busy and the server unreachable. ``_Channel`` closes a connection
whose request head is not complete ``header_timeout`` seconds after it began (for a
new connection: after it was opened), and ``_Admission`` refuses a client's
connection beyond ``client_limit`` open ones (the trusted proxy excepted: behind
it are many clients). Both hook into waitress's connection class and the server's
``channel_class`` call, which are the same in waitress 2.x and 3.x.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel

from prep_agent.core.errors import ConfigError

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1000
"""Most open connections one server may take: waitress watches them with select(),
which cannot watch a descriptor numbered 1024 or more."""


@dataclass(frozen=True)
class ServerLimits:
    """How much one server takes on: worker threads, open connections (in all and
    per client address), idle seconds, and seconds to deliver a request head."""

    threads: int = 8
    connection_limit: int = MAX_CONNECTIONS
    channel_timeout: int = 30
    client_limit: int = 64
    header_timeout: float = 10.0


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into host and port. Raises ``ConfigError``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"listen {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_for(host: str) -> str:
    """The loopback address of ``host``'s family: where a reverse proxy on this host
    connects from (``::1`` for an IPv6 address, ``127.0.0.1`` otherwise)."""
    try:
        family = ipaddress.ip_address(host).version
    except ValueError:
        family = 4  # a host name: waitress resolves it, IPv4 first
    return "::1" if family == 6 else "127.0.0.1"


class _Channel(HTTPChannel):  # type: ignore[misc]
    """waitress's connection, with a time bound on each request head and without
    waitress's busy loop while a worker answers.

    Request head: ``head_since`` is when the request being received began (for a
    new connection, when it was opened); waitress's loop asks every connection
    ``readable()`` at least once a second, and a connection whose head is
    ``header_timeout`` seconds old is closed there. Between requests a keep-alive
    connection is idle, and only waitress's ``channel_timeout`` applies.

    Busy loop: waitress's main loop asks each connection ``writable()``; a
    connection whose worker thread has put part of a response in the output buffer
    says yes, and the loop then only *tries* the buffer's lock, which that worker
    holds while it sends the same bytes itself. On a busy 2-core machine the loop
    spins on select() and keeps taking the GIL from the very workers it waits for:
    measured with wrk -c64 on status.json, 36 loop turns per response and
    ~800 req/s with 8 threads (40 req/s with 2). While a request runs and the
    buffer is below the high watermark the worker sends its own output (waitress
    flushes in ``write_soon``) and wakes the loop when it is done, so the loop has
    nothing to do for that connection: it is left out of select() until then.
    Above the watermark (the worker waits for the loop), and when closing, the
    answer is waitress's own.
    """

    def __init__(
        self,
        server: Any,
        sock: Any,
        addr: Any,
        adj: Any,
        map: Any = None,
        *,
        header_timeout: float,
        admission: _Admission | None = None,
    ) -> None:
        self.header_timeout = header_timeout
        self.head_since: float | None = time.monotonic()
        self.admission = admission
        super().__init__(server, sock, addr, adj, map)

    def received(self, data: bytes) -> bool:
        done = bool(super().received(data))
        if self.request is None or self.request.headers_finished:
            self.head_since = None
        elif self.head_since is None:
            self.head_since = time.monotonic()
        return done

    def readable(self) -> bool:
        since = self.head_since
        if (
            since is not None
            and not self.requests
            and time.monotonic() - since > self.header_timeout
        ):
            self.will_close = True  # so writable() says yes, and handle_write closes
            return False
        return bool(super().readable())

    def writable(self) -> bool:
        if (
            _SENDS_OWN_OUTPUT
            and self.requests
            and self.total_outbufs_len < self.adj.outbuf_high_watermark
            and not (self.will_close or self.close_when_flushed)
        ):
            return False
        return bool(super().writable())

    def del_channel(self, map: Any = None) -> None:
        super().del_channel(map)
        admission, self.admission = self.admission, None
        if admission is not None:
            admission.release(self.addr)


_SENDS_OWN_OUTPUT = hasattr(HTTPChannel, "total_outbufs_len")
"""``_Channel.writable`` reads waitress's output-buffer bookkeeping (waitress >= 1.4;
tested with 2.1.2 and 3.0.2); a waitress without it keeps its own answer."""


class _Admission:
    """The server's ``channel_class``: opens a ``_Channel`` for each accepted
    connection, unless its client address already holds ``limit`` open ones.

    Called by waitress's accept handler as ``channel_class(server, sock, addr, adj,
    map=...)``; a refused connection is closed at once, before it is read. The
    counts change in waitress's loop thread and, when the server stops, in the
    stopping thread: a lock keeps them exact.
    """

    def __init__(self, limit: int, exempt: str | None, header_timeout: float) -> None:
        self.limit = limit
        self.exempt = exempt
        self.header_timeout = header_timeout
        self.open: dict[str, int] = {}
        self._lock = threading.Lock()
        self._warned = -60.0

    def __call__(
        self,
        server: Any,
        sock: Any,
        addr: Any,
        adj: Any,
        map: Any = None,
    ) -> _Channel | None:
        client = _client(addr)
        if client is None or client == self.exempt:
            return _Channel(server, sock, addr, adj, map, header_timeout=self.header_timeout)
        with self._lock:
            held = self.open.get(client, 0)
            if held < self.limit:
                self.open[client] = held + 1
        if held >= self.limit:
            sock.close()
            self._warn(client, held)
            return None
        try:
            return _Channel(
                server, sock, addr, adj, map, header_timeout=self.header_timeout, admission=self
            )
        except BaseException:
            self.release(addr)
            raise

    def release(self, addr: Any) -> None:
        """Count one connection of ``addr`` as closed."""
        client = _client(addr)
        if client is None:
            return
        with self._lock:
            held = self.open.pop(client, 0) - 1
            if held > 0:
                self.open[client] = held

    def _warn(self, client: str, held: int) -> None:
        now = time.monotonic()
        if now - self._warned >= 60:  # at most one line a minute, however many refusals
            self._warned = now
            log.warning(
                "refusing connections from %s: it holds %d open (client limit)", client, held
            )


def _client(addr: Any) -> str | None:
    """The client address of waitress's ``addr`` (None for a Unix socket)."""
    if isinstance(addr, tuple) and addr and isinstance(addr[0], str) and addr[1] is not None:
        return addr[0]
    return None


class Server:
    """waitress serving ``app`` on ``host``:``port``, in a thread.

    ``trusted_proxy`` is the one address whose ``X-Forwarded-For`` gives the
    client address (a reverse proxy), and the one address exempt from
    ``limits.client_limit``; None trusts no one. ``address`` is ``HOST:PORT``
    (``[HOST]:PORT`` for IPv6), as ``parse_listen`` reads it.
    Raises ``ConfigError`` if the address cannot be listened on.
    """

    def __init__(
        self,
        host: str,
        port: int,
        app: WSGIApp,
        limits: ServerLimits | None = None,
        trusted_proxy: str | None = None,
    ) -> None:
        limits = limits or ServerLimits()
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)
        proxy: dict[str, Any] = {}
        if trusted_proxy is not None:
            proxy = {
                "trusted_proxy": trusted_proxy,
                "trusted_proxy_count": 1,
                "trusted_proxy_headers": {"x-forwarded-for"},
            }
        try:
            self._server = waitress.create_server(
                app,
                host=host,
                port=port,
                threads=limits.threads,
                ident="prep-agent",
                connection_limit=limits.connection_limit,
                channel_timeout=limits.channel_timeout,
                clear_untrusted_proxy_headers=True,
                **proxy,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen on {_host_port(host, port)}: {exc.strerror}"
            ) from None
        self._server.channel_class = _Admission(
            limits.client_limit, trusted_proxy, limits.header_timeout
        )
        self.address = _host_port(host, int(self._server.effective_port))
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self) -> None:
        """Start serving in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Close the listening socket and every open connection; join the thread.

        Idle keep-alive connections (browsers, nginx upstreams) would otherwise
        keep waitress's loop running.
        """
        self._server.task_dispatcher.shutdown(cancel_pending=True, timeout=2)
        if self._thread.is_alive():
            # Closed from the loop's own thread: closing its sockets from here can
            # land between the loop's select() lists and the call (EBADF there).
            with contextlib.suppress(OSError):  # a trigger already closed: see below
                self._server.trigger.pull_trigger(self._close_all)
            self._thread.join(timeout=5)
        self._close_all()  # never started, or a loop that did not stop: close now

    def _close_all(self) -> None:
        wasyncore.close_all(self._server._map, ignore_all=True)
