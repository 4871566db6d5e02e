"""One GET of a difusor's ``/health``, bounded in bytes and in time.

Any registered difusor answers the collector's polls, so a broken or hostile
one can send a body of gigabytes, or trickle one a byte at a time, each byte
well within the per-read timeout. So the body is streamed and refused past
``max_bytes``, and the whole exchange (connect, TLS, request, headers, body)
has one deadline: when it passes, a timer shuts the socket down and the read
blocked on it returns at once.

The socket is seen when it is created, through urllib3 connection classes of
our own that the session's adapter gives its pools (also through an HTTP
proxy). Through a SOCKS proxy only the per-read timeouts and the byte cap hold.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import requests  # type: ignore[import-untyped]  # no stubs in Debian 12
import urllib3  # type: ignore[import-untyped]
from requests.adapters import HTTPAdapter  # type: ignore[import-untyped]
from urllib3.connection import (  # type: ignore[import-untyped]
    HTTPConnection,
    HTTPSConnection,
)
from urllib3.connectionpool import (  # type: ignore[import-untyped]
    HTTPConnectionPool,
    HTTPSConnectionPool,
)

from prep_agent.core.errors import Error
from prep_agent.shared.deadline import SocketDeadline

CHUNK = 16 * 1024
"""Bytes asked of the body per read."""
TIMEOUT = "timeout"
"""The error of a poll that did not end in time (the dashboard translates it)."""
CONNECTION_FAILED = "connection failed"
"""The error of a poll that could not connect."""

_local = threading.local()
"""``deadline``: the ``SocketDeadline`` of the poll running in this thread, if any."""


class PollError(Error):
    """A poll failed; the message is what the dashboard shows (one line)."""


def _watched(sock: socket.socket) -> socket.socket:
    deadline = getattr(_local, "deadline", None)
    if deadline is not None:
        deadline.watch(sock)
    return sock


class _HTTPConnection(HTTPConnection):  # type: ignore[misc]
    def _new_conn(self) -> socket.socket:
        return _watched(super()._new_conn())


class _HTTPSConnection(HTTPSConnection):  # type: ignore[misc]
    def _new_conn(self) -> socket.socket:
        return _watched(super()._new_conn())


class _HTTPPool(HTTPConnectionPool):  # type: ignore[misc]
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):  # type: ignore[misc]
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _Adapter(HTTPAdapter):  # type: ignore[misc]
    """requests' adapter, with pools whose connections report their sockets."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = _POOLS
        return manager


def get_health(
    url: str,
    headers: dict[str, str],
    connect_timeout: float,
    read_timeout: float,
    max_bytes: int,
) -> tuple[int, bytes]:
    """GET ``url`` (no redirects, no compression); return the status and the body.

    The whole exchange ends within ``connect_timeout + read_timeout`` seconds
    and reads at most ``max_bytes`` of body (plus one read). Proxies and CA
    bundles come from the environment, as for any ``requests`` call. Raises
    ``PollError``: ``TIMEOUT``, ``CONNECTION_FAILED``, ``body over N bytes``, a
    compressed body, or the error's own text.
    """
    deadline = SocketDeadline(connect_timeout + read_timeout)
    session = requests.Session()
    adapter = _Adapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    _local.deadline = deadline
    deadline.start()
    try:
        with session.get(
            url,
            headers={**headers, "Accept-Encoding": "identity"},
            timeout=(connect_timeout, read_timeout),
            allow_redirects=False,
            stream=True,
        ) as response:
            body = _read_body(response, max_bytes)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise PollError(TIMEOUT if deadline.expired else _describe(exc)) from None
    finally:
        _local.deadline = None
        deadline.close()
        session.close()
    if deadline.expired:  # the body ended because the socket was shut: it is cut short
        raise PollError(TIMEOUT)
    return response.status_code, body


def _read_body(response: Any, max_bytes: int) -> bytes:
    """The body, undecoded, or ``PollError`` once it passes ``max_bytes``."""
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        raise PollError(f"compressed body ({encoding[:40]}) although identity was asked")
    body = bytearray()
    for chunk in response.raw.stream(CHUNK, decode_content=False):
        body += chunk
        if len(body) > max_bytes:
            raise PollError(f"body over {max_bytes} bytes")
    return bytes(body)


def _describe(exc: BaseException) -> str:
    """The dashboard's text of a failed request."""
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)):
        return TIMEOUT
    if isinstance(exc, (requests.ConnectionError, urllib3.exceptions.ProtocolError)):
        return CONNECTION_FAILED
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
