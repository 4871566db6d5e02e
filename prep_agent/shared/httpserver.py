"""waitress, the production WSGI server both the agent and the collector run on.

Plain arguments only (address, application, limits): each side builds its own
application and decides what to trust.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import waitress
from waitress import wasyncore
from waitress.channel import HTTPChannel

from prep_agent.core.errors import ConfigError

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass(frozen=True)
class ServerLimits:
    """How much one server takes on: worker threads, open connections, idle seconds."""

    threads: int = 8
    connection_limit: int = 1000
    channel_timeout: int = 30


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into host and port. Raises ``ConfigError``."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"listen {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class _Channel(HTTPChannel):  # type: ignore[misc]
    """waitress's connection, without its busy loop while a worker answers.

    waitress's main loop asks each connection ``writable()``; a connection whose
    worker thread has put part of a response in the output buffer says yes, and
    the loop then only *tries* the buffer's lock, which that worker holds while
    it sends the same bytes itself. On a busy 2-core machine the loop spins on
    select() and keeps taking the GIL from the very workers it waits for:
    measured with wrk -c64 on status.json, 36 loop turns per response and
    ~800 req/s with 8 threads (40 req/s with 2). While a request runs and the
    buffer is below the high watermark the worker sends its own output (waitress
    flushes in ``write_soon``) and wakes the loop when it is done, so the loop has
    nothing to do for that connection: it is left out of select() until then.
    Above the watermark (the worker waits for the loop), and when closing, the
    answer is waitress's own.
    """

    def writable(self) -> bool:
        if (
            self.requests
            and self.total_outbufs_len < self.adj.outbuf_high_watermark
            and not (self.will_close or self.close_when_flushed)
        ):
            return False
        return bool(super().writable())


class Server:
    """waitress serving ``app`` on ``host``:``port``, in a thread.

    ``trusted_proxy`` is the one address whose ``X-Forwarded-For`` gives the
    client address (a reverse proxy on the same host); None trusts no one.
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
            shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(f"cannot listen on {shown}: {exc.strerror}") from None
        # _Channel reads waitress's output-buffer bookkeeping (waitress >= 1.4; tested
        # with 2.1.2 and 3.0.2). A waitress without it keeps its own, slower, channel.
        if hasattr(HTTPChannel, "total_outbufs_len"):
            self._server.channel_class = _Channel
        self.address = f"{host}:{self._server.effective_port}"
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
        wasyncore.close_all(self._server._map)
        self._thread.join(timeout=5)
