"""Bounded HTTPS GETs for the package source: TLS, key pins, one deadline, byte caps.

``Client`` is one poll's connection to the institute (``agent/fetch.py`` uses
it): ``requests`` with TLS verified against a CA bundle, through
``shared/watched_http``'s adapter, whose connections (1) have the server's
leaf key checked against the configured SPKI SHA-256 pins right after the
handshake, before a request is sent, and (2) report their sockets to the
poll's deadline, which shuts them down once it passes, so a server that
trickles bytes cannot hold a poll longer. Bodies are
streamed undecoded and refused past a byte cap. No redirects are followed
here (the caller follows them, https only).

The sockets are seen through a thread-local: a ``Client`` is used by the
thread that made it.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable

import requests  # type: ignore[import-untyped]  # no stubs in Debian 12
import urllib3  # type: ignore[import-untyped]
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from prep_agent import __version__
from prep_agent.core.errors import PACKAGE_UNSIGNED, Error
from prep_agent.shared.deadline import SocketDeadline
from prep_agent.shared.watched_http import BodyTooLarge, WatchedAdapter, read_capped, watching

StartCheck = Callable[[dict[str, str], bytes], None]
"""Looks at an answer's headers and first bytes; raises FetchError to refuse the body."""
USER_AGENT = f"prep-agent/{__version__}"
"""The fixed ``User-Agent`` of every request to the institute."""
CHUNK = 64 * 1024
"""Bytes asked of a body per read."""

# Reason classes of FetchError (stable: journal, health, tests).
UNREACHABLE = "source-unreachable"
TIMEOUT = "source-timeout"
TLS_FAILED = "source-tls"
PIN_MISMATCH = "source-pin-mismatch"
HTTP_STATUS = "source-http-status"
TOO_LARGE = "package-too-large"
NOT_A_ZIP = "package-not-zip"
TRUNCATED = "package-truncated"
INDEX_INVALID = "source-index-invalid"
UNSIGNED = PACKAGE_UNSIGNED


class FetchError(Error):
    """A poll of the package source failed; ``reason`` is its stable class.

    The message is one line, ``"reason: detail"``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def spki_sha256(der_certificate: bytes) -> bytes:
    """SHA-256 of a DER certificate's SubjectPublicKeyInfo. Raises ValueError."""
    certificate = x509.load_der_x509_certificate(der_certificate)
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


@dataclass(frozen=True)
class Answer:
    """One HTTP answer: status, the headers we use (lowercase names), the body."""

    status: int
    headers: dict[str, str]
    body: bytes


def system_ca() -> str | bool:
    """The system's CA bundle (file, else folder) for ``verify``; True if none is found."""
    paths = ssl.get_default_verify_paths()
    for path in (paths.cafile, paths.openssl_cafile):
        if path and _exists(path):
            return path
    if paths.capath and _exists(paths.capath):
        return paths.capath
    return True


def _exists(path: str) -> bool:
    return os.path.exists(path)


class Client:
    """The HTTPS client of one poll: a session, the pins and the poll's deadline.

    Use as a context manager; the deadline counts from ``__enter__``.
    """

    def __init__(
        self,
        verify: str | bool,
        pins: frozenset[bytes],
        connect_timeout: float,
        read_timeout: float,
        deadline_seconds: float,
    ) -> None:
        self.verify = verify
        self.pins = pins
        self.timeouts = (connect_timeout, read_timeout)
        self.deadline_seconds = deadline_seconds
        self._deadline = SocketDeadline(deadline_seconds)
        self._ends = 0.0
        self._session = requests.Session()
        self._session.mount("https://", WatchedAdapter())
        self._watching = watching(self.watch, self._check_pins)

    def __enter__(self) -> Client:
        self._ends = time.monotonic() + self.deadline_seconds
        self._deadline.start()
        self._watching.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watching.__exit__(None, None, None)
        self._deadline.close()
        self._session.close()

    @property
    def expired(self) -> bool:
        """Whether the poll's deadline has passed (its sockets were shut down)."""
        return self._deadline.expired

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the poll's deadline passes."""
        self._deadline.watch(sock)

    def _check_pins(self, connection: Any) -> None:
        """Refuse a server whose leaf key is not pinned (if pins are set)."""
        if not self.pins:
            return
        der = connection.sock.getpeercert(binary_form=True)
        seen = spki_sha256(der) if der else b""
        if seen not in self.pins:
            connection.close()
            raise FetchError(
                PIN_MISMATCH,
                f"the server's key (SPKI SHA-256 {seen.hex()[:16]}…) is not a pinned key",
            )

    def _timeout(self) -> FetchError:
        return FetchError(TIMEOUT, f"no complete answer within {self.deadline_seconds:g} s")

    def get(
        self,
        url: str,
        headers: dict[str, str],
        max_bytes: int,
        check_start: StartCheck | None = None,
    ) -> Answer:
        """GET ``url`` (no redirects, no compression) and read at most ``max_bytes``.

        ``check_start(headers, first_bytes)``, if given, may raise to refuse a body
        from its headers and first bytes (before it is read whole). Raises
        ``FetchError``: unreachable, timeout, TLS, pin mismatch, body over the cap
        (from Content-Length or while streaming), truncated body.
        """
        if self.expired or time.monotonic() >= self._ends:
            raise self._timeout()
        sent = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **headers}
        try:
            with self._session.get(
                url,
                headers=sent,
                timeout=self.timeouts,
                verify=self.verify,
                allow_redirects=False,
                stream=True,
            ) as response:
                names = {k.lower(): v for k, v in response.headers.items()}
                body = b""
                if response.status_code == 200:
                    body = self._read_body(response, names, max_bytes, check_start)
                return Answer(response.status_code, names, body)
        except FetchError:
            raise
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if self.expired:
                raise self._timeout() from None
            raise _describe(exc) from None

    def _read_body(
        self,
        response: Any,
        headers: dict[str, str],
        max_bytes: int,
        check_start: StartCheck | None,
    ) -> bytes:
        encoding = headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            raise FetchError(
                NOT_A_ZIP, f"compressed body ({encoding[:40]}) although identity was asked"
            )
        declared = _content_length(headers)
        if declared is not None and declared > max_bytes:
            raise FetchError(TOO_LARGE, f"Content-Length {declared} is over {max_bytes} bytes")
        checked = check_start is None
        received = 0

        def start(body: bytearray) -> None:
            nonlocal checked, received
            received = len(body)
            if check_start is not None and not checked and len(body) >= 4:
                check_start(headers, bytes(body[:4]))
                checked = True

        try:
            body = read_capped(response, max_bytes, CHUNK, start)
        except BodyTooLarge:
            raise FetchError(TOO_LARGE, f"body over {max_bytes} bytes") from None
        except (urllib3.exceptions.HTTPError, OSError, requests.RequestException) as exc:
            if self.expired:
                raise self._timeout() from None
            if declared is not None:  # urllib3 2 enforces Content-Length itself
                raise FetchError(
                    TRUNCATED, f"{received} of {declared} bytes (Content-Length)"
                ) from None
            raise FetchError(
                TRUNCATED, f"connection broken after {received} bytes ({type(exc).__name__})"
            ) from None
        if self.expired:  # the body ended because the socket was shut down
            raise self._timeout()
        if declared is not None and len(body) != declared:
            raise FetchError(TRUNCATED, f"{len(body)} of {declared} bytes (Content-Length)")
        if check_start is not None and not checked:
            check_start(headers, bytes(body))
        return bytes(body)


def _content_length(headers: dict[str, str]) -> int | None:
    value = headers.get("content-length")
    if value is None:
        return None
    try:
        length = int(value.strip())
    except ValueError:
        raise FetchError(TRUNCATED, f"Content-Length {value[:40]!r} is not a number") from None
    if length < 0:
        raise FetchError(TRUNCATED, f"Content-Length {length} is negative")
    return length


def _describe(exc: BaseException) -> FetchError:
    """The FetchError of a failed request (one line)."""
    if isinstance(exc, requests.exceptions.SSLError):
        found = _TLS_DETAIL.search(str(exc))
        return FetchError(TLS_FAILED, found.group(0).rstrip(" .") if found else _first_line(exc))
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError, socket.timeout)):
        return FetchError(TIMEOUT, "the server did not answer in time")
    return FetchError(UNREACHABLE, _first_line(exc))


_TLS_DETAIL = re.compile(
    r"certificate verify failed: (?:[^('\\]|'[^'\\]*')+" r"|hostname '[^']*' doesn't match '[^']*'"
)
"""The reason inside the nested text of requests' SSLError (urllib3 1.26 and 2)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
