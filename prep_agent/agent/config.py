"""The agent's configuration: one INI file, loaded into a frozen dataclass."""

from __future__ import annotations

import configparser
import functools
import ipaddress
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from prep_agent.agent.layout import Layout
from prep_agent.agent.source_config import SourceConfig, load_source
from prep_agent.core.errors import ConfigError
from prep_agent.core.manifest import Limits
from prep_agent.shared.httpserver import MAX_CONNECTIONS, ServerLimits
from prep_agent.shared.ini import read_ini

STAMP_MODES = ("reject", "warn", "off")
"""Values of ``stamp_check`` (prep-cut-v1 §4.7)."""
OPENING_TEXT = (
    "La publicación de los Resultados Electorales Preliminares iniciará en cuanto el "
    "Instituto envíe el primer corte de información."
)
"""Text the frame shows before the first cut."""
INSTANCE_NAME = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
"""An instance name (``prep-agent@NAME``): lowercase letters, digits, inner dashes."""
INSTANCE_NAME_MAX = 20
"""Longest instance name: its upload account ``prep-upload-NAME`` must fit the 32
characters of a user name."""


@dataclass(frozen=True)
class Config:
    """Every setting of one agent; paths are absolute."""

    root: Path
    inbox: Path
    election: str
    trust: Path
    threshold: int = 1
    listen: str = "127.0.0.1:8080"
    max_connections: int = MAX_CONNECTIONS
    max_client_connections: int = ServerLimits.client_limit
    header_timeout: float = ServerLimits.header_timeout
    trusted_proxy: str = ""
    """Empty: the loopback address of ``listen``'s family; ``none``; or an address."""
    instance: str = ""
    rescan_interval: float = 5.0
    settle_timeout: float = 120.0
    max_clock_skew: timedelta = timedelta(seconds=300)
    keep_releases: int = 10
    keep_replaced_seconds: float = 60.0
    keep_quarantine: int = 50
    keep_quarantine_bytes: int = 256 * 1024**2
    stale_periods: int = 3
    stamp_check: str = "reject"
    limits: Limits = field(default_factory=Limits)
    service_id: str = "difusor"
    difusor_name: str = "Difusor oficial del PREP"
    logo: Path | None = None
    opening_text: str = OPENING_TEXT
    frame_ancestors: tuple[str, ...] = ("'self'",)
    poll_seconds: int = 15
    health_token: str | None = None
    health_allow: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    push_urls: tuple[str, ...] = ()
    push_key: Path | None = None
    push_period: float = 60.0
    push_connect_timeout: float = 5.0
    push_read_timeout: float = 10.0
    source: SourceConfig = field(default_factory=SourceConfig)
    purge_nodes: tuple[str, ...] = ()
    """``[purge] nodes``: Varnish nodes soft-purged after each swap (packaging/ha)."""
    purge_timeout: float = 2.0
    purge_delay: float = 1.5

    @property
    def layout(self) -> Layout:
        """The folders and files under ``root``."""
        return Layout(self.root)

    # The paths below are shorthands for ``layout``'s (tests and tools use them).

    @property
    def public(self) -> Path:
        """``layout.public``: the frame, its assets and ``status.json``."""
        return self.layout.public

    @property
    def releases(self) -> Path:
        """``layout.releases``: the immutable releases."""
        return self.layout.releases

    @property
    def current(self) -> Path:
        """``layout.current``: the symlink to the published release."""
        return self.layout.current

    @property
    def staging(self) -> Path:
        """``layout.staging``: where a release is built."""
        return self.layout.staging

    @property
    def quarantine(self) -> Path:
        """``layout.quarantine``: rejected cuts."""
        return self.layout.quarantine

    @property
    def state_file(self) -> Path:
        """``layout.state_file``: the durable state."""
        return self.layout.state_file

    @property
    def journal_file(self) -> Path:
        """``layout.journal_file``: the journal."""
        return self.layout.journal_file

    @property
    def lock_file(self) -> Path:
        """``layout.lock_file``: the one-agent-per-root lock."""
        return self.layout.lock_file

    @property
    def publish_lock_file(self) -> Path:
        """``layout.publish_lock_file``: the publication lock."""
        return self.layout.publish_lock_file


TEMPLATE = """\
# prep-agent configuration (prep-cut/1). Lines starting with # are comments.
[agent]
# Identifier of the election this difusor publishes; cuts for another are rejected.
election = {election}
# Agent-owned storage: releases/, current -> releases/..., state.json, journal.jsonl.
root = {root}
# Drop folder written by the institute over SFTP (read-only for the agent).
inbox = {inbox}
# OpenSSH allowed_signers file with the institute's keys (namespace prep-cut).
trust = {trust}
# Distinct trusted keys that must sign each cut.
threshold = {threshold}
# Address of the embedded web server (frame, health).
listen = {listen}
# Name of this agent among several on one host (prep-agent@NAME, written by
# `prep-agent init --instance NAME`): its metrics carry the label prep_instance.
instance = {instance}
# Seconds between full rescans of the drop folder (file events are only hints).
rescan_interval = 5
# Seconds a cut may keep failing while its upload is still arriving.
settle_timeout = 120
# Seconds the institute's clock may be ahead of ours.
max_clock_skew = 300
# Releases kept for rollback, and rejected cuts kept in quarantine (at most
# keep_quarantine of them and keep_quarantine_bytes in all; the oldest go first).
keep_releases = 10
keep_quarantine = 50
keep_quarantine_bytes = 268435456
# Seconds a replaced release is kept even beyond keep_releases: pages, caches and
# nginx (1 s) may still be loading the cut a status.json named a moment ago.
keep_replaced_seconds = 60
# Periods without a new cut before the public page shows the interruption notice.
stale_periods = 3
# Stamps inside CSV/zip files that disagree with cut_time: reject, warn or off.
stamp_check = reject

[server]
# The embedded web server at listen. On its own it suits a demo or a small install;
# public traffic belongs behind nginx (packaging/nginx serves the files itself and
# passes only /health, /livez, /readyz and /metrics to this server).
# Open connections at most (1000 at most: waitress watches them with select()).
max_connections = 1000
# Open connections per client address; the trusted proxy is not limited.
max_client_connections = 64
# Seconds a client may take to send a request line and headers, from its first
# byte (for a new connection: from its opening); slower connections are closed.
header_timeout = 10
# Address of the reverse proxy whose X-Forwarded-For names the client (for
# [health] allow). Empty: the loopback address of listen's family (127.0.0.1, or
# ::1 when listen is an IPv6 address such as [::1]:8080); none: no proxy.
trusted_proxy =

[frame]
# Identifier of this difusor in health reports (serviceId).
service_id = {service_id}
# Name and logo (PNG/SVG/JPEG file) shown in the frame.
difusor_name = {difusor_name}
logo =
# Text shown before the first cut.
opening_text = {opening_text}
# Origins allowed to embed the frame (CSP frame-ancestors), space separated,
# e.g. https://www.mi-portal.mx. 'self' alone allows no other site.
frame_ancestors = 'self'
# Seconds between the page's checks for a new cut (status.json), at least 1.
# Each open page asks once per poll_seconds: below 15, more requests per
# viewer (and per carrier address, against the site's rate limits); worth it
# only behind a cache or CDN, or when cuts come faster than every minute.
poll_seconds = 15

[health]
# File holding the bearer token that unlocks the full /health document.
token_file =
# Client networks that see the full /health document and /metrics without a token.
allow = 127.0.0.1/32 ::1/128

[push]
# Institute collector URLs that receive the signed health report (health-v1 §3),
# space separated, e.g. https://prep.instituto.mx/salud/reportes. Empty: no push.
urls =
# The difusor's ed25519 private key (OpenSSH format) that signs the reports;
# create it with `prep-agent keygen --config FILE` and send the printed line to
# the institute.
key =
# Seconds between reports (one is also sent right after each publication or rejection).
period_seconds = 60
# Seconds to wait for the connection, and for the institute's answer.
connect_timeout = 5
read_timeout = 10

[purge]
# Varnish nodes of an HA edge (packaging/ha) to soft-purge the frame and
# status.json on after each new cut, space separated, e.g. http://10.0.0.2:80
# http://10.0.0.3:80. An accelerator only: a failed purge is logged and counted
# in /metrics, never delays a publication. Empty: no purge.
nodes =
# Seconds to wait for each node's answer.
timeout = 2
# Seconds after the swap before purging: longer than nginx may serve the previous
# status.json (open_file_cache_valid 1s in the packaged site).
delay = 1.5

[limits]
max_manifest_bytes = 33554432
max_files = 200000
max_file_bytes = 2147483648
max_cut_bytes = 21474836480

[source]
# Where cuts come from: drop-folder (signed prep-cut/1 cuts uploaded into inbox,
# the default) or https-package (the institute's PREP package zip, polled over HTTPS).
type = {source_type}
# https-package: a fixed URL that always serves the newest package, or a folder URL
# ending in / whose index (autoindex HTML or a JSON list) names the packages
# YYYYMMDD_HHMM_PREP[_STATE].zip; the newest stamp wins.
url = {source_url}
# PEM bundle trusted instead of the system's CAs (empty: the system's).
ca_file = {ca_file}
# SHA-256 of the server's public key (SPKI), base64 or hex, space separated (e.g.
# the current key and its successor); empty: any key the CAs vouch for.
pin_sha256 =
# true: refuse a package without a valid <url>.sig (SSHSIG over the zip, namespace
# prep-package, by the keys of trust). A .sig that is published but does not verify
# is always refused.
require_signature = false
# Seconds between polls; after errors the wait doubles, up to 300.
poll_seconds = 30
# Largest package downloaded, in bytes, and seconds one poll may take in all.
max_package_bytes = 268435456
deadline_seconds = 300
# The institute's period between cuts, in seconds (a package states none): the
# interruption notice shows after stale_periods of them without a newer package.
cut_period_seconds = 600
"""


def render_template(**values: object) -> str:
    """Return a commented config file with the given values filled in."""
    defaults: dict[str, object] = {
        "service_id": "difusor",
        "difusor_name": "Difusor oficial del PREP",
        "opening_text": OPENING_TEXT,
        "instance": "",
        "source_type": "drop-folder",
        "source_url": "",
        "ca_file": "",
    }
    return TEMPLATE.format(**{**defaults, **values})


def _positive(parser: configparser.ConfigParser, section: str, key: str, default: int) -> int:
    try:
        value = parser.getint(section, key, fallback=default)
    except ValueError:
        raise ConfigError(f"[{section}] {key} must be an integer") from None
    if value < 1:
        raise ConfigError(f"[{section}] {key} must be at least 1")
    return value


def _seconds(parser: configparser.ConfigParser, key: str, default: float) -> float:
    try:
        value = parser.getfloat("agent", key, fallback=default)
    except ValueError:
        raise ConfigError(f"[agent] {key} must be a number of seconds") from None
    if value < 0:
        raise ConfigError(f"[agent] {key} must not be negative")
    return value


def _limits(parser: configparser.ConfigParser) -> Limits:
    base = Limits()
    return Limits(
        max_manifest_bytes=_positive(
            parser, "limits", "max_manifest_bytes", base.max_manifest_bytes
        ),
        max_files=_positive(parser, "limits", "max_files", base.max_files),
        max_file_bytes=_positive(parser, "limits", "max_file_bytes", base.max_file_bytes),
        max_cut_bytes=_positive(parser, "limits", "max_cut_bytes", base.max_cut_bytes),
    )


def _path(parser: configparser.ConfigParser, key: str, base: Path) -> Path:
    value = parser.get("agent", key, fallback="").strip()
    if not value:
        raise ConfigError(f"[agent] {key} is required")
    return (base / value).resolve() if not Path(value).is_absolute() else Path(value)


def load(path: Path) -> Config:
    """Read a config file; relative paths are taken from the file's folder.

    Raises ``ConfigError`` with a one-line reason.
    """
    parser = read_ini(path, "agent")
    base = path.resolve().parent
    stamp = parser.get("agent", "stamp_check", fallback="reject").strip()
    if stamp not in STAMP_MODES:
        raise ConfigError(f"[agent] stamp_check must be one of {', '.join(STAMP_MODES)}")
    source = load_source(parser, base)
    root = _path(parser, "root", base)
    no_inbox = source.type != "drop-folder" and not parser.get("agent", "inbox", fallback="")
    return Config(
        root=root,
        inbox=root / "inbox" if no_inbox else _path(parser, "inbox", base),
        election=parser.get("agent", "election", fallback="").strip() or _missing("election"),
        trust=_path(parser, "trust", base),
        threshold=_positive(parser, "agent", "threshold", 1),
        listen=parser.get("agent", "listen", fallback="127.0.0.1:8080").strip(),
        instance=_instance(parser.get("agent", "instance", fallback="").strip()),
        rescan_interval=_seconds(parser, "rescan_interval", 5.0) or 5.0,
        settle_timeout=_seconds(parser, "settle_timeout", 120.0),
        max_clock_skew=timedelta(seconds=_seconds(parser, "max_clock_skew", 300.0)),
        keep_releases=_positive(parser, "agent", "keep_releases", 10),
        keep_replaced_seconds=_seconds(parser, "keep_replaced_seconds", 60.0),
        keep_quarantine=_positive(parser, "agent", "keep_quarantine", 50),
        keep_quarantine_bytes=_positive(parser, "agent", "keep_quarantine_bytes", 256 * 1024**2),
        stale_periods=_positive(parser, "agent", "stale_periods", 3),
        stamp_check=stamp,
        limits=_limits(parser),
        **_server(parser),
        **_frame(parser, base),
        **_health(parser, base),
        **_push(parser, base),
        source=source,
        **_purge(parser),
    )


def _optional_path(
    parser: configparser.ConfigParser, section: str, key: str, base: Path
) -> Path | None:
    value = parser.get(section, key, fallback="").strip()
    return None if not value else (base / value).resolve()


def _frame(parser: configparser.ConfigParser, base: Path) -> dict[str, Any]:
    get = functools.partial(parser.get, "frame")
    ancestors = tuple(get("frame_ancestors", fallback="'self'").split()) or ("'self'",)
    for origin in ancestors:
        if origin != "'self'" and not re.fullmatch(r"https?://[A-Za-z0-9.*-]+(:[0-9]+)?", origin):
            raise ConfigError(
                f"[frame] frame_ancestors: {origin!r} is not an origin like https://example.mx"
            )
    logo = _optional_path(parser, "frame", "logo", base)
    if logo is not None and logo.suffix.lower() not in (".png", ".svg", ".jpg", ".jpeg", ".webp"):
        raise ConfigError("[frame] logo must be a .png, .svg, .jpg or .webp file")
    poll = _positive(parser, "frame", "poll_seconds", 15) if parser.has_section("frame") else 15
    return {
        "service_id": get("service_id", fallback="difusor").strip() or "difusor",
        "difusor_name": get("difusor_name", fallback="Difusor oficial del PREP").strip(),
        "logo": logo,
        "opening_text": get("opening_text", fallback=OPENING_TEXT).strip() or OPENING_TEXT,
        "frame_ancestors": ancestors,
        "poll_seconds": poll,
    }


def _server(parser: configparser.ConfigParser) -> dict[str, Any]:
    connections = _positive(parser, "server", "max_connections", MAX_CONNECTIONS)
    if connections > MAX_CONNECTIONS:
        raise ConfigError(f"[server] max_connections must be at most {MAX_CONNECTIONS}")
    try:
        timeout = parser.getfloat("server", "header_timeout", fallback=10.0)
    except ValueError:
        raise ConfigError("[server] header_timeout must be a number of seconds") from None
    if not timeout > 0:
        raise ConfigError("[server] header_timeout must be positive")
    proxy = parser.get("server", "trusted_proxy", fallback="").strip()
    if proxy and proxy != "none":
        try:
            proxy = str(ipaddress.ip_address(proxy))
        except ValueError:
            raise ConfigError(
                f"[server] trusted_proxy: {proxy!r} is not an IP address (or none)"
            ) from None
    return {
        "max_connections": connections,
        "max_client_connections": _positive(
            parser, "server", "max_client_connections", ServerLimits.client_limit
        ),
        "header_timeout": timeout,
        "trusted_proxy": proxy,
    }


def _health(parser: configparser.ConfigParser, base: Path) -> dict[str, Any]:
    token_file = _optional_path(parser, "health", "token_file", base)
    token = None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(
                f"[health] cannot read token_file {token_file}: {exc.strerror}"
            ) from None
    allow = tuple(parser.get("health", "allow", fallback="127.0.0.1/32 ::1/128").split())
    for network in allow:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"[health] allow: {network!r} is not an address or network") from None
    return {"health_token": token, "health_allow": allow}


def _push_seconds(parser: configparser.ConfigParser, key: str, default: float) -> float:
    try:
        value = parser.getfloat("push", key, fallback=default)
    except ValueError:
        raise ConfigError(f"[push] {key} must be a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"[push] {key} must be positive")
    return value


def _push(parser: configparser.ConfigParser, base: Path) -> dict[str, Any]:
    urls = tuple(parser.get("push", "urls", fallback="").split())
    for url in urls:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ConfigError(f"[push] urls: {url!r} is not an http(s) URL")
    key = _optional_path(parser, "push", "key", base)
    if urls and key is None:
        raise ConfigError("[push] key is required when urls are set")
    return {
        "push_urls": urls,
        "push_key": key,
        "push_period": _push_seconds(parser, "period_seconds", 60.0),
        "push_connect_timeout": _push_seconds(parser, "connect_timeout", 5.0),
        "push_read_timeout": _push_seconds(parser, "read_timeout", 10.0),
    }


def _purge(parser: configparser.ConfigParser) -> dict[str, Any]:
    nodes = tuple(parser.get("purge", "nodes", fallback="").split())
    for node in nodes:
        if not re.fullmatch(r"http://[^\s/?#]+/?", node):
            raise ConfigError(f"[purge] nodes: {node!r} is not a node like http://10.0.0.2:80")
    try:
        timeout = parser.getfloat("purge", "timeout", fallback=2.0)
    except ValueError:
        raise ConfigError("[purge] timeout must be a number of seconds") from None
    if not timeout > 0:
        raise ConfigError("[purge] timeout must be positive")
    try:
        delay = parser.getfloat("purge", "delay", fallback=1.5)
    except ValueError:
        raise ConfigError("[purge] delay must be a number of seconds") from None
    if not 0 <= delay <= 60:
        raise ConfigError("[purge] delay must be between 0 and 60 seconds")
    return {"purge_nodes": nodes, "purge_timeout": timeout, "purge_delay": delay}


def check_instance_name(name: str) -> str:
    """Return ``name`` if it is a valid instance name. Raises ``ConfigError``."""
    if len(name) > INSTANCE_NAME_MAX or not INSTANCE_NAME.fullmatch(name):
        raise ConfigError(
            f"instance name {name!r}: use up to {INSTANCE_NAME_MAX} lowercase letters, "
            "digits and inner dashes, starting with a letter (e.g. federal, coah-2024)"
        )
    return name


def _instance(value: str) -> str:
    if not value:
        return ""
    try:
        return check_instance_name(value)
    except ConfigError as exc:
        raise ConfigError(f"[agent] instance: {exc}") from None


def _missing(key: str) -> str:
    raise ConfigError(f"[agent] {key} is required")
