"""The report's figures and tables, derived from the counted traffic and the journal.

Pure data: everything the HTML, the CSVs and ``summary.json`` show comes from
``build_summary`` (dictionaries and rows of plain values).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from prep_agent.report.incidents import Incidents
from prep_agent.report.traffic import (
    BASELINE,
    BYTES,
    ERRORS,
    HITS,
    OPERATION,
    PAGES,
    VISITS,
    Traffic,
)

WINDOW_NAMES = {BASELINE: "baseline", OPERATION: "operation"}
"""Keys of the windows in summary.json."""

TOP_PAGES = 25
"""Rows of the top pages tables."""

DEFINITIONS = {
    "hit": "cualquier solicitud válida registrada en la bitácora",
    "page": (
        "solicitud exitosa (2xx o 304) GET/HEAD de un documento: '/', rutas que terminan en "
        "'/', '.html' o '.htm', o sin extensión; no cuentan recursos (/static/, imágenes, "
        "scripts, status.json) ni /health, /metrics"
    ),
    "visit": (
        "solicitudes de una misma IP y agente de usuario separadas por menos de 30 minutos "
        "(como AWStats y Matomo); la visita cuenta en la hora de su primera solicitud"
    ),
    "unique_visitors": (
        "pares distintos IP + agente de usuario en el día, sin contar respuestas 4xx "
        "(como GoAccess)"
    ),
    "bandwidth": "suma de los bytes enviados (campo de tamaño de la bitácora)",
    "bots": (
        "agentes de usuario de robots, monitores y bibliotecas HTTP conocidos; se cuentan "
        "aparte de las personas"
    ),
    "days": "días y horas en el desfase UTC del informe (el de --from)",
    "stale": (
        "publicación desactualizada: sin corte nuevo durante stale_periods × period_seconds "
        "(3 × 600 s por omisión) después del cut_time firmado (prep-cut-v1 §6)"
    ),
}
"""What each figure means (in Spanish: printed in the report and in summary.json)."""


@dataclass(frozen=True)
class Options:
    """The report's windows (aware datetimes) and its freshness parameters."""

    baseline: tuple[datetime, datetime]
    operation: tuple[datetime, datetime]
    period_seconds: int = 600
    stale_periods: int = 3

    @property
    def tz(self) -> timezone:
        """The report's fixed UTC offset (that of the operation window's start)."""
        offset = self.operation[0].utcoffset() or timedelta(0)
        return timezone(offset)


def _empty() -> dict[str, int]:
    return {"hits": 0, "pages": 0, "visits": 0, "unique_visitors": 0, "bytes": 0, "errors_5xx": 0}


def _day_text(day: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=day)).isoformat()


def daily(traffic: Traffic, window: int) -> list[dict[str, Any]]:
    """Per-day figures of a window: people, bots and all (all = GoAccess's hits/visitors)."""
    days: dict[int, dict[str, dict[str, int]]] = {}
    for (w, hour, bot), acc in traffic.hourly.items():
        if w != window:
            continue
        group = days.setdefault(hour // 24, {"people": _empty(), "bots": _empty()})
        fig = group["bots" if bot else "people"]
        fig["hits"] += acc[HITS]
        fig["pages"] += acc[PAGES]
        fig["visits"] += acc[VISITS]
        fig["bytes"] += acc[BYTES]
        fig["errors_5xx"] += acc[ERRORS]
    for (w, day, bot), keys in traffic.uniques.items():
        if w == window:
            group = days.setdefault(day, {"people": _empty(), "bots": _empty()})
            group["bots" if bot else "people"]["unique_visitors"] = len(keys)
    rows = []
    for day in sorted(days):
        people, bots = days[day]["people"], days[day]["bots"]
        every = {k: people[k] + bots[k] for k in people}
        rows.append({"date": _day_text(day), **people, "bots": bots, "all": every})
    return rows


def hourly(traffic: Traffic, window: int, tz: timezone) -> list[dict[str, Any]]:
    """Per-hour figures of a window (people, plus bot hits), in time order."""
    hours: dict[int, dict[str, int]] = {}
    for (w, hour, bot), acc in traffic.hourly.items():
        if w != window:
            continue
        row = hours.setdefault(
            hour, {"hits": 0, "pages": 0, "visits": 0, "bot_hits": 0, "errors_5xx": 0}
        )
        row["errors_5xx"] += acc[ERRORS]
        if bot:
            row["bot_hits"] += acc[HITS]
        else:
            row["hits"] += acc[HITS]
            row["pages"] += acc[PAGES]
            row["visits"] += acc[VISITS]
    offset = tz.utcoffset(None) or timedelta(0)
    rows = []
    for hour in sorted(hours):
        start = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(hours=hour) - offset
        rows.append({"hour": start.astimezone(tz).isoformat(), **hours[hour]})
    return rows


def comparison(days: dict[str, list[dict[str, Any]]], opts: Options) -> list[dict[str, Any]]:
    """Average per day of each figure in the baseline vs the operation window."""
    rows = []
    spans = {
        name: (win[1] - win[0]).total_seconds() / 86400
        for name, win in (("baseline", opts.baseline), ("operation", opts.operation))
    }
    for figure, label in (
        ("visits", "Visitas"),
        ("pages", "Páginas"),
        ("hits", "Hits"),
        ("unique_visitors", "Visitantes únicos (suma diaria)"),
        ("bytes", "Ancho de banda (bytes)"),
        ("bot_hits", "Hits de robots"),
    ):
        avg = {}
        for name in ("baseline", "operation"):
            if figure == "bot_hits":
                total = sum(d["bots"]["hits"] for d in days[name])
            else:
                total = sum(d[figure] for d in days[name])
            avg[name] = total / spans[name] if spans[name] > 0 else 0.0
        ratio = avg["operation"] / avg["baseline"] if avg["baseline"] else None
        rows.append(
            {
                "figure": figure,
                "label": label,
                "baseline_per_day": round(avg["baseline"], 1),
                "operation_per_day": round(avg["operation"], 1),
                "ratio": round(ratio, 2) if ratio is not None else None,
            }
        )
    return rows


def top_pages(traffic: Traffic, window: int) -> list[dict[str, Any]]:
    """The most requested pages of a window (people and bots)."""
    items = sorted(traffic.pages[window].items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_PAGES]
    return [{"page": k.decode("utf-8", "replace"), "pages": v} for k, v in items]


def statuses(traffic: Traffic) -> list[dict[str, Any]]:
    """Hits per HTTP status in each window."""
    codes = sorted(set(traffic.status[BASELINE]) | set(traffic.status[OPERATION]))
    return [
        {
            "status": c.decode(),
            "baseline": traffic.status[BASELINE].get(c, 0),
            "operation": traffic.status[OPERATION].get(c, 0),
        }
        for c in codes
    ]


def availability(
    op_days: list[dict[str, Any]], inc: Incidents | None, opts: Options
) -> dict[str, Any]:
    """Availability figures of the operation window (HTTP, publication, agent)."""
    span = (opts.operation[1] - opts.operation[0]).total_seconds()
    hits = sum(d["all"]["hits"] for d in op_days)
    errors = sum(d["all"]["errors_5xx"] for d in op_days)
    out: dict[str, Any] = {
        "http_5xx": errors,
        "http_success_pct": round(100 * (1 - errors / hits), 3) if hits else None,
    }
    if inc is not None:
        stale = sum(w.seconds for w in inc.stale if w.note != "after_last_cut")
        down = sum(w.seconds for w in inc.downtime)
        pub_span = 0.0
        if inc.cuts:
            first = max(inc.cuts[0].published, opts.operation[0])
            last = min(inc.cuts[-1].published, opts.operation[1])
            pub_span = max(0.0, (last - first).total_seconds())
        out.update(
            {
                "stale_seconds": round(stale, 1),
                "fresh_pct": round(100 * (1 - stale / pub_span), 3) if pub_span else None,
                "agent_down_seconds": round(down, 1),
                "agent_up_pct": round(100 * (1 - down / span), 3) if span else None,
                "cuts_published": len(inc.cuts),
                "cuts_rejected": len(inc.rejected),
            }
        )
    return out


def build_summary(
    traffic: Traffic, inc: Incidents | None, opts: Options, files: list[str]
) -> dict[str, Any]:
    """The whole report as plain data (what summary.json holds, plus the tables)."""
    days = {name: daily(traffic, w) for w, name in WINDOW_NAMES.items()}
    doc: dict[str, Any] = {
        "format": "prep-agent-report/1",
        "definitions": DEFINITIONS,
        "utc_offset": _offset_text(opts.tz),
        "windows": {
            "baseline": {"from": opts.baseline[0].isoformat(), "to": opts.baseline[1].isoformat()},
            "operation": {
                "from": opts.operation[0].isoformat(),
                "to": opts.operation[1].isoformat(),
            },
        },
        "input": {
            "files": files,
            "lines": traffic.lines,
            "garbage_lines": traffic.garbage,
            "outside_windows": traffic.outside,
            "garbage_samples": [{"file": f, "line": n, "text": t} for f, n, t in traffic.samples],
        },
        "baseline": {"days": days["baseline"]},
        "operation": {"days": days["operation"]},
        "comparison": comparison(days, opts),
        "availability": availability(days["operation"], inc, opts),
        "hourly": {name: hourly(traffic, w, opts.tz) for w, name in WINDOW_NAMES.items()},
        "top_pages": {name: top_pages(traffic, w) for w, name in WINDOW_NAMES.items()},
        "status": statuses(traffic),
    }
    if inc is not None:
        doc["incidents"] = incidents_doc(inc, opts)
    return doc


def incidents_doc(inc: Incidents, opts: Options) -> dict[str, Any]:
    """The journal part of the summary (times in the report's offset)."""
    tz = opts.tz

    def iso(t: datetime) -> str:
        return t.astimezone(tz).isoformat(timespec="seconds")

    return {
        "journal_events": inc.events,
        "journal_bad_lines": inc.bad_lines,
        "period_seconds": opts.period_seconds,
        "stale_periods": opts.stale_periods,
        "latency": inc.latency_stats(),
        "cuts": [
            {
                "sequence": c.sequence,
                "cut_time": iso(c.cut_time),
                "received": iso(c.received),
                "published": iso(c.published),
                "delay_s": round(c.delay_s, 1),
                "total_ms": c.total_ms,
                "release": c.release,
            }
            for c in inc.cuts
        ],
        "rejected": [
            {
                "time": iso(r["time"]),
                "sequence": r["sequence"],
                "reason": r["reason"],
                "detail": r["detail"],
            }
            for r in inc.rejected
        ],
        "stale": [
            {
                "start": iso(w.start),
                "end": iso(w.end),
                "seconds": round(w.seconds),
                "after_last_cut": w.note == "after_last_cut",
            }
            for w in inc.stale
        ],
        "downtime": [
            {"start": iso(w.start), "end": iso(w.end), "seconds": round(w.seconds), "cause": w.note}
            for w in inc.downtime
        ],
        "other": [
            {"time": iso(o["time"]), "event": o["event"], "detail": o["detail"]} for o in inc.other
        ],
    }


def _offset_text(tz: timezone) -> str:
    minutes = int((tz.utcoffset(None) or timedelta(0)).total_seconds() // 60)
    sign = "-" if minutes < 0 else "+"
    return f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
