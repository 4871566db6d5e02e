"""Attacks and their containment, from nginx's error log and fail2ban's log.

What the memoria técnica's incidents section lists per hour of the operation:

- requests refused by the site's rate limits: nginx's ``limiting requests`` and
  ``limiting connections`` lines (``limit_req``/``limit_conn``, logged at warn);
- requests blocked by the firewall: ``ModSecurity: Access denied`` lines (one
  per blocked request; matches below the blocking score are not counted);
- bans: fail2ban's ``[JAIL] Ban ADDRESS`` and ``Unban ADDRESS`` lines.

Both logs carry local wall-clock times without an offset; ``log_offset`` says
which (Debian servers log in UTC unless their time zone was changed). Lines
that are none of these are skipped; unreadable times too.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Any

NGINX_LINE = re.compile(r"^(\d{4}/\d\d/\d\d \d\d:\d\d:\d\d) \[\w+\] \d+#\d+: (.*)$")
LIMIT = re.compile(
    r'limiting (requests|connections)(?:, excess: [\d.]+)? by zone "[^"]+", client: ([^,\s]+),'
)
WAF = re.compile(r"ModSecurity: Access denied with code \d+ .*, client: ([^,\s]+), server:")
FAIL2BAN_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ fail2ban\.actions\s+\[\d+\]: \w+\s+"
    r"\[([^\]]+)\] (Ban|Unban) (\S+)$"
)


@dataclass(frozen=True)
class Ban:
    """One ban: jail, address, start, and end (None while still banned at the end)."""

    jail: str
    address: str
    start: datetime
    end: datetime | None


@dataclass
class EdgeIncidents:
    """Counts per hour (start of the hour, aware) and the bans, inside the window."""

    limited: dict[datetime, int] = field(default_factory=lambda: defaultdict(int))
    limited_clients: dict[datetime, set[str]] = field(default_factory=lambda: defaultdict(set))
    blocked: dict[datetime, int] = field(default_factory=lambda: defaultdict(int))
    blocked_clients: dict[datetime, set[str]] = field(default_factory=lambda: defaultdict(set))
    bans: list[Ban] = field(default_factory=list)
    per_client: dict[str, dict[str, int]] = field(
        default_factory=lambda: defaultdict(lambda: {"limited": 0, "blocked": 0, "bans": 0})
    )
    lines: int = 0


def parse_offset(text: str) -> tzinfo:
    """``+HH:MM``/``-HH:MM``/``Z`` as a fixed offset; raises ValueError otherwise."""
    if text in ("Z", "UTC"):
        return timezone.utc
    match = re.fullmatch(r"([+-])(\d\d):(\d\d)", text)
    if not match:
        raise ValueError(f"{text!r} is not an offset like -06:00")
    sign = -1 if match.group(1) == "-" else 1
    return timezone(sign * timedelta(hours=int(match.group(2)), minutes=int(match.group(3))))


def _hour(t: datetime, tz: tzinfo) -> datetime:
    return t.astimezone(tz).replace(minute=0, second=0, microsecond=0)


def _lines(paths: Iterable[Path]) -> Iterable[str]:
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            yield from fh


def read_edge(
    error_logs: Iterable[Path],
    fail2ban_logs: Iterable[Path],
    window: tuple[datetime, datetime],
    log_offset: tzinfo,
    tz: tzinfo,
) -> EdgeIncidents:
    """Count the window's rate-limited and blocked requests and its bans.

    ``window`` is aware; hours are those of ``tz`` (the report's offset).
    Raises OSError if a log cannot be read.
    """
    out = EdgeIncidents()
    start, end = window
    for line in _lines(error_logs):
        match = NGINX_LINE.match(line.rstrip("\n"))
        if not match:
            continue
        when = datetime.strptime(match.group(1), "%Y/%m/%d %H:%M:%S").replace(tzinfo=log_offset)
        if not start <= when < end:
            continue
        text = match.group(2)
        hour = _hour(when, tz)
        limit = LIMIT.search(text)
        if limit:
            out.lines += 1
            out.limited[hour] += 1
            out.limited_clients[hour].add(limit.group(2))
            out.per_client[limit.group(2)]["limited"] += 1
            continue
        waf = WAF.search(text)
        if waf:
            out.lines += 1
            out.blocked[hour] += 1
            out.blocked_clients[hour].add(waf.group(1))
            out.per_client[waf.group(1)]["blocked"] += 1
    open_bans: dict[tuple[str, str], datetime] = {}
    for line in _lines(fail2ban_logs):
        match = FAIL2BAN_LINE.match(line.rstrip("\n"))
        if not match:
            continue
        when = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=log_offset)
        key = (match.group(2), match.group(4))
        if match.group(3) == "Ban":
            open_bans[key] = when
        elif key in open_bans:
            began = open_bans.pop(key)
            out.bans.append(Ban(key[0], key[1], began, when))
    out.bans += [Ban(j, a, t, None) for (j, a), t in open_bans.items()]
    out.bans = sorted(
        (b for b in out.bans if b.start < end and (b.end is None or b.end >= start)),
        key=lambda b: (b.start, b.jail, b.address),
    )
    for ban in out.bans:
        out.per_client[ban.address]["bans"] += 1
        out.lines += 1
    return out


def edge_doc(edge: EdgeIncidents, tz: tzinfo) -> dict[str, Any]:
    """The part of summary.json about attacks and containment (times in ``tz``)."""

    def iso(t: datetime) -> str:
        return t.astimezone(tz).isoformat(timespec="seconds")

    hours = sorted(set(edge.limited) | set(edge.blocked) | {_hour(b.start, tz) for b in edge.bans})
    return {
        "hourly": [
            {
                "hour": iso(h),
                "rate_limited": edge.limited.get(h, 0),
                "rate_limited_clients": len(edge.limited_clients.get(h, ())),
                "waf_blocks": edge.blocked.get(h, 0),
                "waf_clients": len(edge.blocked_clients.get(h, ())),
                "bans": sum(1 for b in edge.bans if _hour(b.start, tz) == h),
            }
            for h in hours
        ],
        "bans": [
            {
                "jail": b.jail,
                "address": b.address,
                "start": iso(b.start),
                "end": iso(b.end) if b.end else None,
                "seconds": round((b.end - b.start).total_seconds()) if b.end else None,
            }
            for b in edge.bans
        ],
        "clients": [
            {"address": address, **counts}
            for address, counts in sorted(
                edge.per_client.items(),
                key=lambda kv: (-(kv[1]["limited"] + kv[1]["blocked"]), kv[0]),
            )[:50]
        ],
        "totals": {
            "rate_limited": sum(edge.limited.values()),
            "waf_blocks": sum(edge.blocked.values()),
            "bans": len(edge.bans),
            "clients": len(edge.per_client),
        },
    }
