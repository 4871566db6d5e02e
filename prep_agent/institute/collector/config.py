"""The collector's configuration (the institute's side of health-v1 §3).

One INI file::

    [collector]
    listen = 0.0.0.0:8090
    database = collector.sqlite
    trust = difusores_allowed_signers
    manifests = /srv/prep/salida

    [difusor:diario-a]
    name = Diario A
    health_url = https://prep.diario-a.mx/health
    token_file = diario-a.token
    sftp = prep-upload@prep.diario-a.mx:22:/srv/prep-agent/inbox
    host_key = prep.diario-a.mx ssh-ed25519 AAAA...
    identity = institute_upload

    [distribute]
    allowed_signers = institute_allowed_signers
    election = coah-ayun-2021
"""

from __future__ import annotations

import configparser
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prep_agent.core.errors import ConfigError
from prep_agent.shared.ini import read_ini

SECTION = "collector"
DIFUSOR_PREFIX = "difusor:"
"""Sections ``[difusor:ID]`` register a difusor (ID is its serviceId)."""


AUDIT = "audit"
"""Section ``[audit]``: how the collector audits the difusores' public copies."""
DISTRIBUTE = "distribute"
"""Section ``[distribute]``: how ``prep-agent distribute`` checks and sends cuts."""


@dataclass(frozen=True)
class SftpTarget:
    """Where a difusor receives cuts: ``user@host:port:/path``."""

    user: str
    host: str
    port: int
    path: str

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}:{self.path}"


@dataclass(frozen=True)
class DifusorEntry:
    """One registered difusor."""

    service_id: str
    name: str
    health_url: str | None = None
    token: str | None = None
    sftp: SftpTarget | None = None
    host_key: str | None = None
    """The pinned host key: ``keytype base64`` from its known_hosts line."""
    identity: Path | None = None
    status_url: str | None = None
    contact: str | None = None
    enabled: bool = True


@dataclass(frozen=True)
class DistributeSettings:
    """The ``[distribute]`` section: the institute's own trust and the delivery limits."""

    signers: Path | None = None
    """The institute's allowed_signers (the file every difusor trusts)."""
    election: str | None = None
    threshold: int = 1
    workers: int = 8
    connect_timeout: float = 10.0
    transfer_timeout: float = 300.0
    retry_for: float = 540.0
    """Seconds a cut is retried on a failing target (less than one period)."""
    backoff_max: float = 60.0
    confirm_timeout: float = 120.0
    state: Path | None = None
    """Folder for per-target known_hosts files and cut snapshots (default: beside the database)."""


@dataclass(frozen=True)
class AuditSettings:
    """The ``[audit]`` section: auditing every difusor's public copy after every cut.

    Trust, election and threshold are ``[distribute]``'s (the institute's own);
    auditing is on when ``[distribute] allowed_signers`` is set, unless ``enabled = no``.
    """

    enabled: bool = False
    signers: Path | None = None
    election: str | None = None
    threshold: int = 1
    sample: int = 20
    full_every: int = 6
    """Every this many audits of a difusor, one is in full."""
    after: float = 120.0
    """Seconds after a cut is recorded when it is audited even if unreported."""
    timeout: float = 10.0
    concurrency: int = 4
    workers: int = 4


@dataclass(frozen=True)
class CollectorConfig:
    """Every setting of the collector; paths are absolute."""

    trust: Path
    database: Path
    listen: str = "127.0.0.1:8090"
    manifests: Path | None = None
    difusores: tuple[DifusorEntry, ...] = ()
    report_period: float = 60.0
    silent_after: float = 180.0
    poll_interval: float = 60.0
    connect_timeout: float = 5.0
    read_timeout: float = 10.0
    max_skew: float = 300.0
    period_seconds: float | None = None
    unlink_periods: int = 3
    history_rows: int = 100_000
    refresh_seconds: int = 10
    dashboard_allow: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    distribute: DistributeSettings = field(default_factory=DistributeSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)


TEMPLATE = """\
# prep-agent collector: the institute's view of every difusor (health-v1 §3).
[collector]
# Address of the collector's web server: POST /reports (difusores push here),
# the dashboard /, /api/difusores and /difusores.csv.
listen = {listen}
# SQLite file of reports and rejections (bounded to history_rows reports).
database = collector.sqlite
# allowed_signers of the difusores: one line per difusor, principal = its serviceId,
# namespaces="prep-health" (the line `prep-agent keygen` prints).
trust = {trust}
# Folder of the institute's signed cuts (NNNNNN/prep-manifest.json, as `prep-agent
# simulate --out` writes them); empty to record cuts with `collector --record-cut`.
manifests =
# Seconds between each difusor's reports ([push] period_seconds of the agents).
report_period = 60
# Seconds without any report (push or poll) before a difusor is "sin reportes".
silent_after = 180
# Seconds between polls of every difusor's /health, and their timeouts: a whole
# poll ends within connect_timeout + read_timeout, and reads at most 256 KiB.
poll_interval = 60
connect_timeout = 5
read_timeout = 10
# A pushed report's time must be within this many seconds of our clock.
max_skew = 300
# Cut period in seconds (default: period_seconds of the latest signed manifest) and
# how many periods a difusor may fail before the convocatoria says to unlink it.
period_seconds =
unlink_periods = 3
history_rows = 100000
# Seconds between the dashboard's automatic refreshes.
refresh_seconds = 10
# Client networks that may see the dashboard, the API and the CSV.
dashboard_allow = 127.0.0.1/32 ::1/128

# `prep-agent distribute`: the institute checks every cut with the difusores' own rules
# before sending it, against the allowed_signers every difusor trusts.
[distribute]
allowed_signers =
election =
threshold = 1
# Difusores sending at the same time (one still connecting holds no slot), ssh
# ConnectTimeout, seconds for one upload, seconds a cut is retried on a failing
# difusor, longest pause between retries.
workers = 8
connect_timeout = 10
transfer_timeout = 300
retry_for = 540
backoff_max = 60
# Seconds to wait for each difusor's status.json to show a delivered cut.
confirm_timeout = 120

# After every signed cut the collector audits each difusor's public copy (as
# `prep-agent audit` does, with [distribute]'s allowed_signers): `sample` random
# files plus the entry page and every CSV and zip, and every `full_every`-th audit
# of a difusor in full; a cut is audited once the difusor reports it, or `after`
# seconds after it was recorded. An altered copy counts toward unlink_periods.
[audit]
enabled = yes
sample = 20
full_every = 6
after = 120
timeout = 10
concurrency = 4
workers = 4

# One section per difusor; the id is its serviceId.
# [difusor:diario-a]
# name = Diario A
# contact = Ana Pérez, 844 123 4567, ana@diario-a.mx
# health_url = https://prep.diario-a.mx/health
# token_file = /etc/prep-collector/diario-a.token
# Where `distribute` uploads: USER@HOST:PORT:/PATH, the host key pinned from its
# known_hosts line (never learned on first use), and the institute's identity file.
# sftp = prep-upload@prep.diario-a.mx:22:/srv/prep-agent/inbox
# host_key = prep.diario-a.mx ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA...
# identity = /etc/prep-collector/institute_upload
# Public status the delivery is confirmed on (default: /status.json of health_url's site).
# status_url = https://prep.diario-a.mx/status.json
# enabled = yes
"""


def _number(parser: configparser.ConfigParser, key: str, default: float) -> float:
    try:
        value = parser.getfloat(SECTION, key, fallback=default)
    except ValueError:
        raise ConfigError(f"[{SECTION}] {key} must be a number") from None
    if value <= 0:
        raise ConfigError(f"[{SECTION}] {key} must be positive")
    return value


def _path(parser: configparser.ConfigParser, section: str, key: str, base: Path) -> Path | None:
    value = parser.get(section, key, fallback="").strip()
    return None if not value else (base / value).resolve()


def _read_token(path: Path | None, section: str) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise ConfigError(f"[{section}] cannot read token_file {path}: {exc.strerror}") from None


def parse_sftp(text: str, section: str) -> SftpTarget:
    """Parse ``user@host:port:/path`` (host may be ``[v6]``). Raises ``ConfigError``."""
    found = re.fullmatch(r"([^@\s:/]+)@(\[[0-9A-Fa-f:.]+\]|[^:\s\[\]/@]+):(\d{1,5}):(/\S*)", text)
    if found is None or not 0 < int(found.group(3)) < 65536:
        raise ConfigError(f"[{section}] sftp {text!r} is not USER@HOST:PORT:/PATH")
    return SftpTarget(
        found.group(1), found.group(2).strip("[]"), int(found.group(3)), found.group(4)
    )


def parse_host_key(text: str, section: str) -> str:
    """``keytype base64`` out of a known_hosts line (or of the bare key). Raises ``ConfigError``."""
    fields = text.split()
    for i, word in enumerate(fields[:-1]):
        if re.fullmatch(r"(ssh|ecdsa|sk)-[a-z0-9@.-]+", word) and re.fullmatch(
            r"[A-Za-z0-9+/]{40,}={0,2}", fields[i + 1]
        ):
            return f"{word} {fields[i + 1]}"
    raise ConfigError(f"[{section}] host_key is not a known_hosts line")


def _status_url(parser: configparser.ConfigParser, section: str, health: str | None) -> str | None:
    url = parser.get(section, "status_url", fallback="").strip() or None
    if url is None and health is not None:
        origin = re.match(r"https?://[^/]+", health)
        url = origin.group(0) + "/status.json" if origin else None
    if url is not None and not re.fullmatch(r"https?://\S+", url):
        raise ConfigError(f"[{section}] status_url {url!r} is not an http(s) URL")
    return url


def _delivery(parser: configparser.ConfigParser, section: str, base: Path) -> dict[str, Any]:
    """The distribution keys of one ``[difusor:ID]`` section."""
    sftp = parser.get(section, "sftp", fallback="").strip()
    host_key = parser.get(section, "host_key", fallback="").strip()
    identity = _path(parser, section, "identity", base)
    if sftp and not host_key:
        raise ConfigError(f"[{section}] sftp needs host_key (keys are never learned on first use)")
    try:
        enabled = parser.getboolean(section, "enabled", fallback=True)
    except ValueError:
        raise ConfigError(f"[{section}] enabled must be yes or no") from None
    return {
        "sftp": parse_sftp(sftp, section) if sftp else None,
        "host_key": parse_host_key(host_key, section) if host_key else None,
        "identity": identity,
        "contact": parser.get(section, "contact", fallback="").strip() or None,
        "enabled": enabled,
    }


def _distribute(parser: configparser.ConfigParser, base: Path) -> DistributeSettings:
    if not parser.has_section(DISTRIBUTE):
        return DistributeSettings()

    def number(key: str, default: float) -> float:
        try:
            value = parser.getfloat(DISTRIBUTE, key, fallback=default)
        except ValueError:
            raise ConfigError(f"[{DISTRIBUTE}] {key} must be a number") from None
        if value <= 0:
            raise ConfigError(f"[{DISTRIBUTE}] {key} must be positive")
        return value

    election = parser.get(DISTRIBUTE, "election", fallback="").strip() or None
    return DistributeSettings(
        signers=_path(parser, DISTRIBUTE, "allowed_signers", base),
        election=election,
        threshold=int(number("threshold", 1)),
        workers=int(number("workers", 8)),
        connect_timeout=number("connect_timeout", 10.0),
        transfer_timeout=number("transfer_timeout", 300.0),
        retry_for=number("retry_for", 540.0),
        backoff_max=number("backoff_max", 60.0),
        confirm_timeout=number("confirm_timeout", 120.0),
        state=_path(parser, DISTRIBUTE, "state", base),
    )


def _audit(parser: configparser.ConfigParser, distribute: DistributeSettings) -> AuditSettings:
    """The ``[audit]`` section (its trust is ``[distribute]``'s)."""

    def number(key: str, default: float) -> float:
        try:
            value = parser.getfloat(AUDIT, key, fallback=default)
        except ValueError:
            raise ConfigError(f"[{AUDIT}] {key} must be a number") from None
        if value <= 0:
            raise ConfigError(f"[{AUDIT}] {key} must be positive")
        return value

    try:
        enabled = parser.getboolean(AUDIT, "enabled", fallback=True)
    except ValueError:
        raise ConfigError(f"[{AUDIT}] enabled must be yes or no") from None
    return AuditSettings(
        enabled=enabled and distribute.signers is not None,
        signers=distribute.signers,
        election=distribute.election,
        threshold=distribute.threshold,
        sample=int(number("sample", 20)),
        full_every=int(number("full_every", 6)),
        after=number("after", 120.0),
        timeout=number("timeout", 10.0),
        concurrency=int(number("concurrency", 4)),
        workers=int(number("workers", 4)),
    )


def _difusores(parser: configparser.ConfigParser, base: Path) -> tuple[DifusorEntry, ...]:
    entries = []
    for section in parser.sections():
        if not section.startswith(DIFUSOR_PREFIX):
            continue
        service_id = section[len(DIFUSOR_PREFIX) :].strip()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", service_id):
            raise ConfigError(f"[{section}]: {service_id!r} is not a valid serviceId")
        url = parser.get(section, "health_url", fallback="").strip() or None
        if url is not None and not re.fullmatch(r"https?://\S+", url):
            raise ConfigError(f"[{section}] health_url {url!r} is not an http(s) URL")
        entries.append(
            DifusorEntry(
                service_id=service_id,
                name=parser.get(section, "name", fallback=service_id).strip() or service_id,
                health_url=url,
                token=_read_token(_path(parser, section, "token_file", base), section),
                status_url=_status_url(parser, section, url),
                **_delivery(parser, section, base),
            )
        )
    return tuple(entries)


def load_collector(path: Path) -> CollectorConfig:
    """Read a collector config file; relative paths are taken from its folder.

    Raises ``ConfigError`` with a one-line reason.
    """
    parser = read_ini(path, SECTION)
    base = path.resolve().parent
    trust = _path(parser, SECTION, "trust", base)
    if trust is None:
        raise ConfigError(f"[{SECTION}] trust is required")
    period = parser.get(SECTION, "period_seconds", fallback="").strip()
    allow = tuple(parser.get(SECTION, "dashboard_allow", fallback="127.0.0.1/32 ::1/128").split())
    for network in allow:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"[{SECTION}] dashboard_allow: bad network {network!r}") from None
    report_period = _number(parser, "report_period", 60.0)
    distribute = _distribute(parser, base)
    return CollectorConfig(
        trust=trust,
        database=_path(parser, SECTION, "database", base) or base / "collector.sqlite",
        listen=parser.get(SECTION, "listen", fallback="127.0.0.1:8090").strip(),
        manifests=_path(parser, SECTION, "manifests", base),
        difusores=_difusores(parser, base),
        report_period=report_period,
        silent_after=_number(parser, "silent_after", 3 * report_period),
        poll_interval=_number(parser, "poll_interval", 60.0),
        connect_timeout=_number(parser, "connect_timeout", 5.0),
        read_timeout=_number(parser, "read_timeout", 10.0),
        max_skew=_number(parser, "max_skew", 300.0),
        period_seconds=_number(parser, "period_seconds", 600.0) if period else None,
        unlink_periods=int(_number(parser, "unlink_periods", 3)),
        history_rows=int(_number(parser, "history_rows", 100_000)),
        refresh_seconds=max(1, int(_number(parser, "refresh_seconds", 10))),
        dashboard_allow=allow,
        distribute=distribute,
        audit=_audit(parser, distribute),
    )


def render_collector_template(listen: str, trust: Path) -> str:
    """A commented collector config with the given address and trust file."""
    return TEMPLATE.format(listen=listen, trust=trust)
