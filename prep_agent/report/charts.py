"""The report's charts, drawn here as inline SVG (no plotting library).

Two kinds, the comparisons a reader of the memoria técnica makes: hits per hour
(people and robots stacked) with visits and pages per hour on a second axis,
hours with server errors marked; and visits, pages and hits per day for both
windows. Every bar carries a ``<title>`` with its exact figures (a tooltip in
the browser) and the daily bars their values; text stays text, searchable in
the page and in the printed PDF. The same numbers are in the report's tables
and CSVs.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

WINDOW_LABELS = {"baseline": "Referencia (habitual)", "operation": "Operación del PREP"}
"""Spanish names of the windows in legends."""

COLORS = {
    "baseline": "#8c8c8c",
    "operation": "#1f5fa8",
    "bots": "#d9822b",
    "visits": "#2a9d4b",
    "pages": "#7b3fa0",
    "errors": "#c0392b",
    "grid": "#e3e3e3",
    "axis": "#555555",
}
"""Grey for the usual traffic, blue for the PREP, orange for robots, red for errors."""

WIDTH = 760
"""Width of every chart (the page scales it to its column)."""

FONT = "DejaVu Sans, Arial, sans-serif"
"""The report page's own font."""

CHAR_WIDTH = 6.2
"""Approximate width of a digit at the charts' 11 px font, to size margins."""

HOUR_STEPS = (1, 2, 3, 4, 6, 12, 24, 48, 72, 168)
"""Hours between labelled ticks on the hourly charts; the smallest that fits is used."""


def nice_ticks(top: float, count: int = 5) -> list[int]:
    """Whole-number axis ticks from 0 up to at least ``top``, about ``count`` steps
    of 1, 2, 2.5 or 5 times a power of ten (2.5 only from 25 on)."""
    if top <= 0:
        return [0, 1]
    raw = top / count
    power = 10 ** math.floor(math.log10(raw)) if raw >= 1 else 1
    multipliers = (1, 2, 2.5, 5, 10) if power >= 10 else (1, 2, 5, 10)
    step = next(m * power for m in multipliers if m * power >= raw)
    steps = math.ceil(top / step - 1e-9)
    return [int(i * step) for i in range(steps + 1)]


def number(value: float) -> str:
    """A count as the report's tables write it: thin spaces between thousands."""
    return f"{value:,.0f}".replace(",", "\u202f")


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _f(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _open(height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
        f'width="{WIDTH}" height="{height}" role="img" font-family="{FONT}" '
        f'font-size="11" fill="#222">',
        f"<title>{_esc(title)}</title>",
    ]


def _text(x: float, y: float, text: str, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{_f(x)}" y="{_f(y)}" text-anchor="{anchor}"{extra}>{_esc(text)}</text>'


def _rect(x: float, y: float, w: float, h: float, color: str) -> str:
    return f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(w)}" height="{_f(h)}" fill="{color}"/>'


def _line(x1: float, y1: float, x2: float, y2: float, color: str, width: float = 1) -> str:
    return (
        f'<line x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}" '
        f'stroke="{color}" stroke-width="{_f(width)}"/>'
    )


def _legend(x: float, y: float, items: Sequence[tuple[str, str, str]]) -> list[str]:
    """One row of (kind ``bar``/``line``/``band``, colour, label) from ``x``."""
    out = []
    for kind, color, label in items:
        if kind == "line":
            out.append(_line(x, y - 4, x + 16, y - 4, color, 2))
        elif kind == "band":
            out.append(_rect(x, y - 6, 16, 4, color))
        else:
            out.append(_rect(x, y - 10, 16, 10, color))
        out.append(_text(x + 21, y, label, "start"))
        x += 21 + len(label) * CHAR_WIDTH + 18
    return out


def _legend_width(items: Sequence[tuple[str, str, str]]) -> float:
    return sum(21 + len(label) * CHAR_WIDTH + 18 for _, _, label in items) - 18


def _axis_width(ticks: Sequence[int]) -> float:
    return max(len(number(t)) for t in ticks) * CHAR_WIDTH + 8


def _y_axis(
    ticks: Sequence[int], x: float, top: float, bottom: float, side: str, grid: float | None
) -> list[str]:
    """Tick labels on the ``left`` or ``right`` of ``x``; grid lines to ``grid``."""
    out = []
    for t in ticks:
        y = bottom - t / ticks[-1] * (bottom - top)
        if grid is not None and t:
            out.append(_line(min(x, grid), y, max(x, grid), y, COLORS["grid"]))
        label_x = x - 5 if side == "left" else x + 5
        anchor = "end" if side == "left" else "start"
        out.append(_text(label_x, y + 4, number(t), anchor))
    return out


def _axis_title(x: float, y: float, text: str) -> str:
    return _text(x, y, text, extra=f' transform="rotate(-90 {_f(x)} {_f(y)})"')


def _when(t: datetime) -> str:
    return f"{t:%d/%m/%Y %H:%M} h"


class Hour(NamedTuple):
    """One hour of an hourly chart (an absent hour had no traffic: zeros)."""

    time: datetime
    people: int
    bots: int
    visits: int
    pages: int
    errors: int


def _hour(t: datetime, row: dict[str, Any]) -> Hour:
    keys = ("hits", "bot_hits", "visits", "pages", "errors_5xx")
    people, bots, visits, pages, errors = (int(row.get(k, 0)) for k in keys)
    return Hour(t, people, bots, visits, pages, errors)


def _hour_labels(start: datetime, slots: int, width: float) -> tuple[int, list[int]]:
    """The step in hours between labels and the slots that get one (aligned to
    the local hour: 00:00, 06:00, ...), so labels ~48 px wide never overlap."""
    room = max(1, int(width // 48))
    step = next((s for s in HOUR_STEPS if slots / s <= room), HOUR_STEPS[-1])
    chosen = []
    for i in range(slots):
        t = start + timedelta(hours=i)
        hours_since_midnight = t.hour + (t.toordinal() * 24 if step > 24 else 0)
        if hours_since_midnight % step == 0:
            chosen.append(i)
    return step, chosen


def hourly_chart(hours: list[dict[str, Any]], title: str) -> str:
    """Stacked bars of hits per hour (people, robots), visits and pages per hour as
    lines on the right axis, and a red mark under the hours with 5xx answers.

    ``hours`` are the summary's rows (``hour`` in ISO 8601 with offset, ``hits``,
    ``bot_hits``, ``visits``, ``pages``, ``errors_5xx``); hours absent had no traffic.
    """
    height = 300
    rows = {datetime.fromisoformat(h["hour"]): h for h in hours}
    start = min(rows) if rows else None
    slots = int((max(rows) - start).total_seconds() // 3600) + 1 if start else 0
    series = (
        [_hour(t, rows.get(t, {})) for t in (start + timedelta(hours=i) for i in range(slots))]
        if start
        else []
    )
    left = nice_ticks(max((s.people + s.bots for s in series), default=0))
    right = nice_ticks(max((max(s.visits, s.pages) for s in series), default=0))
    x0 = 24 + _axis_width(left)
    x1 = WIDTH - 24 - _axis_width(right)
    y0, y1 = 58.0, height - 44.0
    out = _open(height, title)
    out.append(_text(WIDTH / 2, 18, title, extra=' font-size="13" font-weight="bold"'))
    legend = [
        ("bar", COLORS["operation"], "Hits (personas)"),
        ("bar", COLORS["bots"], "Hits (robots)"),
        ("line", COLORS["visits"], "Visitas"),
        ("line", COLORS["pages"], "Páginas"),
    ]
    if any(s.errors for s in series):
        legend.append(("band", COLORS["errors"], "Horas con errores 5xx"))
    out += _legend(x0, 40, legend)
    out += _y_axis(left, x0, y0, y1, "left", x1)
    out += _y_axis(right, x1, y0, y1, "right", None)
    out.append(_axis_title(12, (y0 + y1) / 2, "Hits por hora"))
    out.append(_axis_title(WIDTH - 8, (y0 + y1) / 2, "Visitas / páginas por hora"))
    if not series:
        out.append(_text((x0 + x1) / 2, (y0 + y1) / 2, "Sin tráfico en este periodo"))
    slot = (x1 - x0) / max(slots, 1)

    def yl(v: float) -> float:
        return y1 - v / left[-1] * (y1 - y0)

    def yr(v: float) -> float:
        return y1 - v / right[-1] * (y1 - y0)

    for i, s in enumerate(series):
        x = x0 + i * slot
        people, bots, errors = s.people, s.bots, s.errors
        tip = (
            f"{_when(s.time)}: {number(people)} hits de personas, {number(bots)} de robots; "
            f"{number(s.visits)} visitas, {number(s.pages)} páginas"
            + (f"; {number(errors)} errores 5xx" if errors else "")
        )
        bars = [f"<g><title>{_esc(tip)}</title>"]
        if people:
            bars.append(
                _rect(x + slot * 0.05, yl(people), slot * 0.9, y1 - yl(people), COLORS["operation"])
            )
        if bots:
            top = yl(people + bots)
            bars.append(_rect(x + slot * 0.05, top, slot * 0.9, yl(people) - top, COLORS["bots"]))
        if errors:
            bars.append(_rect(x, y1 + 1, slot, 4, COLORS["errors"]))
        bars.append("</g>")
        out.append("".join(bars))
    for key in ("visits", "pages"):
        points = " ".join(
            f"{_f(x0 + (i + 0.5) * slot)},{_f(yr(getattr(s, key)))}" for i, s in enumerate(series)
        )
        if points:
            out.append(
                f'<polyline points="{points}" fill="none" stroke="{COLORS[key]}" '
                'stroke-width="1.5" stroke-linejoin="round"/>'
            )
    out.append(_line(x0, y1, x1, y1, COLORS["axis"]))
    if start is not None:
        _, labelled = _hour_labels(start, slots, x1 - x0)
        for i in labelled:
            t = start + timedelta(hours=i)
            x = x0 + i * slot
            out.append(_line(x, y1, x, y1 + 7, COLORS["axis"]))
            out.append(_text(x, y1 + 19, f"{t:%d/%m}"))
            out.append(_text(x, y1 + 32, f"{t:%H:%M}"))
    out.append("</svg>")
    return "\n".join(out)


def daily_chart(days: dict[str, list[dict[str, Any]]]) -> str:
    """Bars per day of visits, pages and hits, one panel each, for both windows,
    with each bar's value above it when it fits."""
    height = 260
    figures = (("visits", "Visitas"), ("pages", "Páginas"), ("hits", "Hits"))
    out = _open(height, "Visitas, páginas y hits por día")
    panel = WIDTH / len(figures)
    y0, y1 = 40.0, height - 66.0
    for n, (figure, label) in enumerate(figures):
        bars = [
            (name, d["date"], int(d[figure]))
            for name in ("baseline", "operation")
            for d in days[name]
        ]
        ticks = nice_ticks(max((v for *_, v in bars), default=0))
        x0 = n * panel + _axis_width(ticks) + 4
        x1 = (n + 1) * panel - 12
        out.append(_text((x0 + x1) / 2, 22, f"{label} por día", extra=' font-weight="bold"'))
        out += _y_axis(ticks, x0, y0, y1, "left", x1)
        out.append(_line(x0, y1, x1, y1, COLORS["axis"]))
        if not bars:
            out.append(_text((x0 + x1) / 2, (y0 + y1) / 2, "Sin tráfico"))
            continue
        slot = (x1 - x0) / len(bars)
        for i, (name, day, value) in enumerate(bars):
            x = x0 + i * slot
            top = y1 - value / ticks[-1] * (y1 - y0)
            shown = f"{day[8:10]}/{day[5:7]}"
            tip = f"{WINDOW_LABELS[name]}, {shown}/{day[:4]}: {number(value)} {label.lower()}"
            parts = [f"<g><title>{_esc(tip)}</title>"]
            parts.append(_rect(x + slot * 0.12, top, slot * 0.76, y1 - top, COLORS[name]))
            if len(number(value)) * 5.6 <= slot:
                parts.append(_text(x + slot / 2, top - 4, number(value), extra=' font-size="9.5"'))
            parts.append("</g>")
            out.append("".join(parts))
            cx, cy = x + slot / 2, y1 + 16
            if slot >= 40:
                out.append(_text(cx, cy, shown))
            else:
                rotate = f' transform="rotate(-45 {_f(cx + 4)} {_f(cy - 6)})"'
                out.append(_text(cx + 4, cy - 2, shown, "end", rotate))
    legend = [("bar", COLORS[n], WINDOW_LABELS[n]) for n in WINDOW_LABELS]
    out += _legend((WIDTH - _legend_width(legend)) / 2, height - 12, legend)
    out.append("</svg>")
    return "\n".join(out)
