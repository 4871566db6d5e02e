"""One GET of a difusor's ``/health``, bounded in bytes and in time.

Any registered difusor answers the collector's polls, so a broken or hostile
one can send a body of gigabytes, or trickle one a byte at a time, each byte
well within the per-read timeout. So the body is streamed and refused past
``max_bytes``, and the whole exchange (connect, TLS, request, headers, body)
has one deadline: when it passes, a timer shuts the socket down and the read
blocked on it returns at once.

The socket is seen when it is created, through ``shared/watched_http``'s
adapter (also through an HTTP proxy). Through a SOCKS proxy only the per-read
timeouts and the byte cap hold.
"""

from __future__ import annotations

import socket
from typing import Any

import requests  # type: ignore[import-untyped]  # no stubs in Debian 12
import urllib3  # type: ignore[import-untyped]

from prep_agent.core.errors import Error
from prep_agent.shared.deadline import SocketDeadline
from prep_agent.shared.watched_http import BodyTooLarge, WatchedAdapter, read_capped, watching

CHUNK = 16 * 1024
"""Bytes asked of the body per read."""
TIMEOUT = "timeout"
"""The error of a poll that did not end in time (the dashboard translates it)."""
CONNECTION_FAILED = "connection failed"
"""The error of a poll that could not connect."""


class PollError(Error):
    """A poll failed; the message is what the dashboard shows (one line)."""


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
    adapter = WatchedAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    deadline.start()
    try:
        with (
            watching(deadline.watch),
            session.get(
                url,
                headers={**headers, "Accept-Encoding": "identity"},
                timeout=(connect_timeout, read_timeout),
                allow_redirects=False,
                stream=True,
            ) as response,
        ):
            body = _read_body(response, max_bytes)
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise PollError(TIMEOUT if deadline.expired else _describe(exc)) from None
    finally:
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
    try:
        return bytes(read_capped(response, max_bytes, CHUNK))
    except BodyTooLarge as exc:
        raise PollError(str(exc)) from None


def _describe(exc: BaseException) -> str:
    """The dashboard's text of a failed request."""
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)):
        return TIMEOUT
    if isinstance(exc, (requests.ConnectionError, urllib3.exceptions.ProtocolError)):
        return CONNECTION_FAILED
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
