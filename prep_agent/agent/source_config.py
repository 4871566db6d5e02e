"""``[source]`` of the agent config: where cuts come from (``agent/config.py`` reads it)."""

from __future__ import annotations

import base64
import configparser
import functools
import re
from dataclasses import dataclass
from pathlib import Path

from prep_agent.core.errors import ConfigError

SOURCE_TYPES = ("drop-folder", "https-package")
"""Values of ``[source] type``: signed prep-cut/1 cuts in the drop folder, or the
institute's PREP package zip polled over HTTPS (``agent/fetch.py``)."""


@dataclass(frozen=True)
class SourceConfig:
    """``[source]``: where cuts come from."""

    type: str = "drop-folder"
    url: str = ""
    """https-package: a fixed URL of the newest package, or a folder URL ending in /."""
    ca_file: Path | None = None
    """PEM bundle trusted instead of the system's CAs."""
    pins: frozenset[bytes] = frozenset()
    """SPKI SHA-256 digests of the server keys accepted (empty: no pinning)."""
    require_signature: bool = False
    poll_seconds: float = 30.0
    max_package_bytes: int = 256 * 1024**2
    deadline_seconds: float = 300.0
    cut_period_seconds: int = 600
    """The institute's period between cuts (a package states none): the frame's
    interruption notice shows after ``stale_periods`` of them (prep-cut-v1 §6)."""


def load_source(parser: configparser.ConfigParser, base: Path) -> SourceConfig:
    """``[source]`` of a parsed config (relative paths from ``base``).

    Raises ``ConfigError`` with a one-line reason.
    """
    get = functools.partial(parser.get, "source")
    kind = get("type", fallback="drop-folder").strip() or "drop-folder"
    if kind not in SOURCE_TYPES:
        raise ConfigError(f"[source] type must be one of {', '.join(SOURCE_TYPES)}")
    url = get("url", fallback="").strip()
    if kind == "https-package" and not url:
        raise ConfigError("[source] url is required when type is https-package")
    if url and not re.fullmatch(r"https://[^\s/?#@]+(/[^\s#]*)?", url):
        raise ConfigError(f"[source] url: {url!r} is not an https:// URL")
    ca_file = _ca_file(parser, base)
    try:
        require = parser.getboolean("source", "require_signature", fallback=False)
    except ValueError:
        raise ConfigError("[source] require_signature must be true or false") from None
    return SourceConfig(
        type=kind,
        url=url,
        ca_file=ca_file,
        pins=frozenset(_pin(p) for p in get("pin_sha256", fallback="").split()),
        require_signature=require,
        poll_seconds=_source_seconds(parser, "poll_seconds", 30.0),
        max_package_bytes=_max_bytes(parser),
        deadline_seconds=_source_seconds(parser, "deadline_seconds", 300.0),
        cut_period_seconds=_cut_period(parser),
    )


def _pin(text: str) -> bytes:
    """One ``pin_sha256`` value: 32 bytes in hex or base64 (``sha256//`` prefix allowed)."""
    value = text.removeprefix("sha256//")  # curl's --pinnedpubkey spelling
    if re.fullmatch(r"[0-9a-fA-F]{64}", value):
        return bytes.fromhex(value)
    try:
        digest = base64.b64decode(value, validate=True)
    except ValueError:
        digest = b""
    if len(digest) != 32:
        raise ConfigError(
            f"[source] pin_sha256: {text!r} is not a SHA-256 digest (64 hex digits or base64)"
        )
    return digest


def _source_seconds(parser: configparser.ConfigParser, key: str, default: float) -> float:
    try:
        value = parser.getfloat("source", key, fallback=default)
    except ValueError:
        raise ConfigError(f"[source] {key} must be a number of seconds") from None
    if not value >= 1:
        raise ConfigError(f"[source] {key} must be at least 1")
    return value


def _ca_file(parser: configparser.ConfigParser, base: Path) -> Path | None:
    value = parser.get("source", "ca_file", fallback="").strip()
    if not value:
        return None
    path = (base / value).resolve()
    if not path.is_file():
        raise ConfigError(f"[source] ca_file {path} does not exist")
    return path


def _max_bytes(parser: configparser.ConfigParser) -> int:
    try:
        value = parser.getint("source", "max_package_bytes", fallback=256 * 1024**2)
    except ValueError:
        raise ConfigError("[source] max_package_bytes must be an integer") from None
    if value < 1:
        raise ConfigError("[source] max_package_bytes must be at least 1")
    return value


def _cut_period(parser: configparser.ConfigParser) -> int:
    try:
        value = parser.getint("source", "cut_period_seconds", fallback=600)
    except ValueError:
        raise ConfigError("[source] cut_period_seconds must be an integer") from None
    if not 60 <= value <= 3600:
        raise ConfigError("[source] cut_period_seconds must be between 60 and 3600")
    return value
