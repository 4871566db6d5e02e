"""``requests`` sessions whose sockets a deadline can see, and capped body reads.

A per-read timeout does not bound an exchange (see ``shared/deadline``): the
deadline must be told every socket the exchange opens. ``WatchedAdapter``
gives requests' pools urllib3 connection classes of our own that hand each new
socket to the hooks set with ``watching()`` in the calling thread, and, for
HTTPS, call ``on_connect`` right after the handshake, before a request is sent
(the package fetcher checks its key pins there). Through an HTTP proxy too;
through a SOCKS proxy only the per-read timeouts and the byte cap hold.

Used by the agent's package fetcher (``agent/https_get``) and the collector's
health polls (``institute/collector/poll``).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable

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

SocketHook = Callable[[socket.socket], None]
ConnectHook = Callable[[Any], None]
"""Called with the urllib3 HTTPS connection once its TLS handshake is done."""


@dataclass(frozen=True)
class _Hooks:
    on_socket: SocketHook
    on_connect: ConnectHook | None


_local = threading.local()
"""``hooks``: the ``_Hooks`` of the exchange running in this thread, if any."""


@contextlib.contextmanager
def watching(on_socket: SocketHook, on_connect: ConnectHook | None = None) -> Iterator[None]:
    """Within the block, this thread's ``WatchedAdapter`` connections report to the hooks."""
    _local.hooks = _Hooks(on_socket, on_connect)
    try:
        yield
    finally:
        _local.hooks = None


def _hooks() -> _Hooks | None:
    hooks: _Hooks | None = getattr(_local, "hooks", None)
    return hooks


def _reported(sock: socket.socket) -> socket.socket:
    hooks = _hooks()
    if hooks is not None:
        hooks.on_socket(sock)
    return sock


class _HTTPConnection(HTTPConnection):  # type: ignore[misc]
    def _new_conn(self) -> socket.socket:
        return _reported(super()._new_conn())


class _HTTPSConnection(HTTPSConnection):  # type: ignore[misc]
    def _new_conn(self) -> socket.socket:
        return _reported(super()._new_conn())

    def connect(self) -> None:
        super().connect()
        hooks = _hooks()
        if hooks is not None and hooks.on_connect is not None:
            hooks.on_connect(self)


class _HTTPPool(HTTPConnectionPool):  # type: ignore[misc]
    ConnectionCls = _HTTPConnection


class _HTTPSPool(HTTPSConnectionPool):  # type: ignore[misc]
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class WatchedAdapter(HTTPAdapter):  # type: ignore[misc]
    """requests' adapter whose pools' connections report to ``watching()``'s hooks."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = _POOLS
        return manager


class BodyTooLarge(Error):
    """A streamed body passed its cap."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(f"body over {max_bytes} bytes")


def read_capped(
    response: Any,
    max_bytes: int,
    chunk: int,
    on_chunk: Callable[[bytearray], None] | None = None,
) -> bytearray:
    """Read a ``stream=True`` response's body undecoded, at most ``max_bytes``.

    ``on_chunk(body_so_far)`` runs after each read and may raise to refuse the
    body. Raises ``BodyTooLarge`` once the body passes ``max_bytes`` (at most
    one ``chunk`` more is read); the stream's own errors pass through.
    """
    body = bytearray()
    for data in response.raw.stream(chunk, decode_content=False):
        body += data
        if len(body) > max_bytes:
            raise BodyTooLarge(max_bytes)
        if on_chunk is not None:
            on_chunk(body)
    return body
