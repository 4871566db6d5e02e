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
"""

from __future__ import annotations

import configparser
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from prep_agent.core.errors import ConfigError
from prep_agent.shared.ini import read_ini

SECTION = "collector"
DIFUSOR_PREFIX = "difusor:"
"""Sections ``[difusor:ID]`` register a difusor (ID is its serviceId)."""


@dataclass(frozen=True)
class DifusorEntry:
    """One registered difusor."""

    service_id: str
    name: str
    health_url: str | None = None
    token: str | None = None


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

# One section per difusor; the id is its serviceId.
# [difusor:diario-a]
# name = Diario A
# health_url = https://prep.diario-a.mx/health
# token_file = /etc/prep-collector/diario-a.token
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
    )


def render_collector_template(listen: str, trust: Path) -> str:
    """A commented collector config with the given address and trust file."""
    return TEMPLATE.format(listen=listen, trust=trust)
