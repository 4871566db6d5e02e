"""The ``https-package`` source: one poll finds and downloads the newest PREP package.

Most institutes publish each cut as a zip, ``YYYYMMDD_HHMM_PREP[_STATE].zip``,
on an HTTPS URL. ``[source] url`` is either

- a fixed URL that always serves the newest package (its name is taken from
  ``Content-Disposition``, else from the URL's last path segment), or
- a folder URL ending in ``/`` whose index is an autoindex HTML page or a JSON
  list (strings, or objects with ``name`` or ``url``), or the URL of such a JSON
  list (a path ending in ``.json``), naming packages: the newest stamp wins,
  and two different names with that stamp are refused.

One ``Fetcher.poll()`` resolves the package URL, GETs it conditionally
(``If-None-Match`` / ``If-Modified-Since`` from the last package fetched from
that URL: a ``304`` means nothing new), checks that the body is a whole zip
(``PK\\3\\4`` at the start, refused as soon as the first bytes show otherwise,
e.g. a ``200`` with an HTML error page; the Content-Length and the zip's
end-of-central-directory record at the end), then the signature
``<package URL>.sig``: SSHSIG over the zip bytes in namespace ``prep-package``
(``core/protocol.py``), trusted by the same ``allowed_signers`` and threshold
as prep-cut/1. A ``.sig`` that is absent (404/410) leaves the package unsigned,
refused if ``require_signature``; one that is present but does not verify is
always refused; one that verifies is returned with the package, byte for byte,
for the release to keep. Index and signature are not fetched conditionally: they are
small, and an unchanged index must not hide a package replaced under the same
name. The transport (TLS, pins, deadline, byte caps) is ``agent/https_get.py``.

Errors are ``FetchError`` (one line, ``reason: detail``); after one,
``delay()`` grows exponentially up to ``BACKOFF_CAP`` seconds.
"""

from __future__ import annotations

import json
import posixpath
import random
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.message import Message
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit

from prep_agent.agent.https_get import (
    HTTP_STATUS,
    INDEX_INVALID,
    NOT_A_ZIP,
    TRUNCATED,
    UNREACHABLE,
    UNSIGNED,
    Answer,
    Client,
    FetchError,
    StartCheck,
    system_ca,
)
from prep_agent.agent.source_config import SourceConfig
from prep_agent.core import sshsig
from prep_agent.core.allowed_signers import AllowedSigner
from prep_agent.core.errors import SIGNATURE_MALFORMED, SIGNATURE_UNTRUSTED, SignatureFormatError
from prep_agent.core.package import package_stamp
from prep_agent.core.protocol import NAMESPACE_PACKAGE
from prep_agent.core.verify import MAX_SIGNATURE_BYTES

MAX_INDEX_BYTES = 2 * 1024**2
"""Largest index page or JSON list read."""
MAX_REDIRECTS = 5
"""Redirects followed per request (https only)."""
BACKOFF_CAP = 300.0
"""Longest wait between polls after errors, in seconds (unless ``poll_seconds`` is longer)."""
_ZIP_START = b"PK\x03\x04"
_EOCD = b"PK\x05\x06"
_EOCD_SIZE = 22
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Settings:
    """What one ``https-package`` source needs (``[source]`` of the agent config)."""

    url: str
    ca_file: str | None = None
    """PEM bundle trusted instead of the system's CAs."""
    pins: frozenset[bytes] = frozenset()
    """SPKI SHA-256 digests, one of which the server's leaf key must match (empty: no pin)."""
    require_signature: bool = False
    poll_seconds: float = 30.0
    max_bytes: int = 256 * 1024**2
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    deadline_seconds: float = 300.0
    """The whole poll (index, package, signature) ends within this many seconds."""


def settings_of(source: SourceConfig) -> Settings:
    """The fetch settings of an agent config's ``[source]`` (type https-package)."""
    return Settings(
        url=source.url,
        ca_file=str(source.ca_file) if source.ca_file else None,
        pins=source.pins,
        require_signature=source.require_signature,
        poll_seconds=source.poll_seconds,
        max_bytes=source.max_package_bytes,
        deadline_seconds=source.deadline_seconds,
    )


@dataclass(frozen=True)
class Validators:
    """What a conditional GET sends back: the ``ETag`` and ``Last-Modified`` seen."""

    etag: str | None = None
    last_modified: str | None = None

    def headers(self) -> dict[str, str]:
        """``If-None-Match`` / ``If-Modified-Since`` for these validators."""
        sent = {}
        if self.etag:
            sent["If-None-Match"] = self.etag
        if self.last_modified:
            sent["If-Modified-Since"] = self.last_modified
        return sent


@dataclass(frozen=True)
class Package:
    """A downloaded package whose bytes are a whole zip, and its signature's verdict."""

    url: str
    file_name: str
    data: bytes
    signed_by: tuple[str, ...] | None
    """Fingerprints of the trusted keys that signed it, or None: no ``.sig`` published."""
    validators: Validators
    signature: bytes | None = None
    """The ``.sig`` bytes as published, when they verified (None: unsigned), kept in the
    release so that anyone can verify the zip again."""

    @property
    def host(self) -> str:
        """The institute's host the package came from."""
        return urlsplit(self.url).hostname or ""


@dataclass
class Fetcher:
    """Polls one package source; remembers validators per URL and the error streak."""

    settings: Settings
    signers: Sequence[AllowedSigner]
    threshold: int = 1
    validators: dict[str, Validators] = field(default_factory=dict)
    """The validators of the last package fetched, by the URL asked (before redirects)."""
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def poll(self, now: datetime) -> Package | None:
        """One poll: the newest package if it is new, else None (``304``).

        ``now`` (aware) is the time signatures are checked at. Raises
        ``FetchError``; the package's validators are remembered only when it is
        returned, so a failed poll downloads it again next time.
        """
        try:
            asked, package = self._poll(now)
        except FetchError:
            self.failures += 1
            raise
        self.failures = 0
        if package is not None:  # kept under the URL asked, which may redirect
            self.validators[asked] = package.validators
        return package

    def forget(self) -> None:
        """Forget every validator: the next poll downloads the newest package again."""
        self.validators.clear()

    def delay(self) -> float:
        """Seconds until the next poll: ``poll_seconds``, or after errors a backoff
        doubling from it up to ``BACKOFF_CAP`` (with up to 20 % less, at random, so
        that many difusores do not retry in step)."""
        return backoff(self.failures, self.settings.poll_seconds, self.rng.random())

    def _poll(self, now: datetime) -> tuple[str, Package | None]:
        """The package URL asked (before redirects) and the package, if new."""
        s = self.settings
        verify: str | bool = s.ca_file if s.ca_file else system_ca()
        with Client(verify, s.pins, s.connect_timeout, s.read_timeout, s.deadline_seconds) as web:
            if is_index_url(s.url):
                url, name = newest_in_index(s.url, _get(web, s.url, _INDEX_ACCEPT, MAX_INDEX_BYTES))
                disposition = False
            else:
                url, name, disposition = s.url, "", True
            known = self.validators.get(url, Validators())
            final, answer = _follow(
                web, url, {**_ZIP_ACCEPT, **known.headers()}, s.max_bytes, _check_zip_start
            )
            if answer.status == 304:
                return url, None
            _expect_ok(answer, final)
            check_zip_end(answer.body)
            if disposition:
                name = package_file_name(final, answer.headers.get("content-disposition", ""))
            signed_by, signature = self._signature(web, final, answer.body, now)
        validators = Validators(answer.headers.get("etag"), answer.headers.get("last-modified"))
        return url, Package(final, name, answer.body, signed_by, validators, signature)

    def _signature(
        self, web: Client, url: str, data: bytes, now: datetime
    ) -> tuple[tuple[str, ...] | None, bytes | None]:
        """The fingerprints of the trusted keys that signed ``data`` and the ``.sig``
        bytes, or ``(None, None)`` if none is published."""
        sig_url = url + ".sig"
        final, answer = _follow(web, sig_url, {}, MAX_SIGNATURE_BYTES)
        if answer.status in (404, 410):
            if self.settings.require_signature:
                raise FetchError(UNSIGNED, f"no signature at {sig_url} and one is required")
            return None, None
        _expect_ok(answer, final)
        try:
            blocks = sshsig.parse_armored(answer.body)
        except SignatureFormatError as exc:
            raise FetchError(SIGNATURE_MALFORMED, f"{sig_url}: {exc}") from None
        result = sshsig.count_trusted(blocks, data, self.signers, NAMESPACE_PACKAGE, now)
        if len(result.keys) < self.threshold:
            why = "; ".join(result.reasons) or "no block"
            raise FetchError(
                SIGNATURE_UNTRUSTED,
                f"signed by {len(result.keys)}/{self.threshold} required trusted keys ({why})",
            )
        return tuple(key.fingerprint() for key in result.keys), answer.body


_INDEX_ACCEPT = {"Accept": "application/json, text/html;q=0.9, */*;q=0.1"}
_ZIP_ACCEPT = {"Accept": "application/zip, application/octet-stream;q=0.9, */*;q=0.1"}


def backoff(failures: int, poll_seconds: float, jitter: float = 0.0) -> float:
    """Seconds to wait after ``failures`` consecutive failed polls.

    ``poll_seconds`` with no failure; then ``poll_seconds × 2^failures``, capped at
    ``max(BACKOFF_CAP, poll_seconds)``, less ``jitter`` × 20 % (``jitter`` in [0, 1)).
    """
    if failures <= 0:
        return poll_seconds
    cap = max(BACKOFF_CAP, poll_seconds)
    grown = poll_seconds * 2.0 ** min(failures, 32)
    return min(grown, cap) * (1.0 - 0.2 * jitter)


def _get(web: Client, url: str, headers: dict[str, str], max_bytes: int) -> bytes:
    final, answer = _follow(web, url, headers, max_bytes)
    _expect_ok(answer, final)
    return answer.body


def _follow(
    web: Client,
    url: str,
    headers: dict[str, str],
    max_bytes: int,
    check: StartCheck | None = None,
) -> tuple[str, Answer]:
    """GET ``url`` following up to ``MAX_REDIRECTS`` https redirects; return the final
    URL and its answer."""
    for _ in range(MAX_REDIRECTS + 1):
        answer = web.get(url, headers, max_bytes, check)
        if answer.status not in _REDIRECTS:
            return url, answer
        location = answer.headers.get("location", "")
        target = urljoin(url, location)
        if not location or urlsplit(target).scheme != "https":
            raise FetchError(HTTP_STATUS, f"{url}: redirect {answer.status} to a non-https URL")
        url = target
    raise FetchError(HTTP_STATUS, f"{url}: more than {MAX_REDIRECTS} redirects")


def _expect_ok(answer: Answer, url: str) -> None:
    if answer.status != 200:
        raise FetchError(HTTP_STATUS, f"HTTP {answer.status} from {url}")


def _check_zip_start(headers: dict[str, str], first: bytes) -> None:
    """Refuse a body that is not a zip from its first bytes (an HTML error page...)."""
    if first[:4] == _ZIP_START:
        return
    kind = headers.get("content-type", "").split(";")[0].strip() or "no Content-Type"
    looks = "an HTML page" if first.lstrip()[:1] == b"<" else f"bytes {first[:4]!r}"
    raise FetchError(NOT_A_ZIP, f"the answer is {looks} ({kind}), not a zip")


def check_zip_end(data: bytes) -> None:
    """Raise ``FetchError`` (truncated) unless ``data`` ends with a zip's
    end-of-central-directory record (its comment reaching exactly the end)."""
    if data[:4] != _ZIP_START:
        raise FetchError(NOT_A_ZIP, "the body does not start like a zip")
    start = max(0, len(data) - _EOCD_SIZE - 0xFFFF)
    position = data.rfind(_EOCD, start)
    while position >= 0:
        if position + _EOCD_SIZE <= len(data):
            (comment,) = struct.unpack_from("<H", data, position + 20)
            if position + _EOCD_SIZE + comment == len(data):
                return
        position = data.rfind(_EOCD, start, position)
    raise FetchError(TRUNCATED, f"no end of the zip's central directory in {len(data)} bytes")


def package_file_name(url: str, disposition: str) -> str:
    """The package's file name: ``Content-Disposition``'s ``filename`` if it is a plain
    name, else the URL's last path segment. Raises ``FetchError`` if neither is one."""
    if disposition:
        message = Message()
        message["Content-Disposition"] = disposition
        name = message.get_filename()
        if name and _plain_name(name):
            return name
    name = unquote(posixpath.basename(urlsplit(url).path))
    if not _plain_name(name):
        raise FetchError(INDEX_INVALID, f"{url}: no file name for the package")
    return name


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not re.search(r"[/\\\x00-\x1f\x7f]", name)


class _Links(HTMLParser):
    """Collects the ``href`` of every ``<a>`` of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.extend(value for key, value in attrs if key == "href" and value)


def index_links(body: bytes) -> list[str]:
    """The references an index names: a JSON list (strings, or objects with ``url``
    or ``name``) or the links of an HTML page. Raises ``FetchError``."""
    text = body.decode("utf-8", errors="replace").lstrip("\ufeff")
    if text.lstrip()[:1] in ("[", "{"):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise FetchError(INDEX_INVALID, f"the JSON index does not parse: {exc}") from None
        if not isinstance(items, list):
            raise FetchError(INDEX_INVALID, "the JSON index is not a list")
        links = []
        for item in items:
            if isinstance(item, dict):
                item = item.get("url") or item.get("name")
            if isinstance(item, str):
                links.append(item)
        return links
    parser = _Links()
    parser.feed(text)
    parser.close()
    return parser.hrefs


def is_index_url(url: str) -> bool:
    """Whether ``url`` names an index (a folder URL ending in ``/``, or a ``.json``
    file) rather than the package itself."""
    path = urlsplit(url).path
    return path.endswith("/") or path.lower().endswith(".json")


def newest_in_index(index_url: str, body: bytes) -> tuple[str, str]:
    """The URL and file name of the newest package an index names.

    Raises ``FetchError`` if it names none, if two different names share the
    newest stamp, or if the newest is not on https.
    """
    best: dict[str, tuple[str, str]] = {}
    newest = ""
    for link in index_links(body):
        url = urljoin(index_url, link.strip())
        name = unquote(posixpath.basename(urlsplit(url).path))
        stamp = package_stamp(name)
        if stamp is None or urlsplit(url).scheme not in ("https", "http"):
            continue
        if stamp > newest:
            newest, best = stamp, {}
        if stamp == newest:
            best[name] = (url.split("#")[0], name)
    if not best:
        raise FetchError(INDEX_INVALID, f"{index_url} names no YYYYMMDD_HHMM_PREP*.zip package")
    if len(best) > 1:
        names = ", ".join(sorted(best))
        raise FetchError(INDEX_INVALID, f"{index_url}: several packages of stamp {newest}: {names}")
    url, name = next(iter(best.values()))
    if urlsplit(url).scheme != "https":
        raise FetchError(UNREACHABLE, f"{url}: the package is not on https")
    return url, name
