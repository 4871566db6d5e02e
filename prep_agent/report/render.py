"""Writing the report: the Spanish HTML page, a CSV per table and summary.json."""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prep_agent.core.csvcell import csv_safe
from prep_agent.report import charts as report_charts

REASONS_ES = {
    "signature-malformed": "firma con formato inválido",
    "signature-untrusted": "firma no confiable",
    "manifest-invalid": "manifiesto inválido",
    "path-invalid": "ruta inválida",
    "wrong-election": "elección equivocada",
    "rollback": "secuencia anterior (rollback)",
    "equivocation": "misma secuencia, contenido distinto",
    "time-invalid": "fecha u hora inválida",
    "incomplete": "corte incompleto",
    "file-mismatch": "archivo distinto al firmado",
    "file-type": "tipo de archivo no permitido",
    "limit-exceeded": "límite excedido",
    "stamp-mismatch": "sello de corte discrepante",
    "zip-invalid": "zip inválido",
}
"""Spanish names of the rejection reasons."""

CSS = """
body{font-family:"DejaVu Sans",Arial,sans-serif;font-size:10.5pt;color:#222;margin:2em auto;
max-width:60em;line-height:1.35}
h1{font-size:18pt;margin-bottom:.2em}h2{font-size:13pt;border-bottom:2px solid #1f5fa8;
margin-top:1.6em;break-after:avoid}h3{font-size:11pt;break-after:avoid}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:9pt;break-inside:auto}
th,td{border:1px solid #bbb;padding:2px 6px;vertical-align:top}
th{background:#eef2f8;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}tr{break-inside:avoid}
.chart svg{width:100%;height:auto}.chart{break-inside:avoid;margin:1em 0}
.muted{color:#666;font-size:9pt}dl.defs dt{font-weight:bold}dl.defs dd{margin:0 0 .4em 1.2em}
.comments{border:1px dashed #888;min-height:8em;padding:.6em;white-space:pre-wrap}
@media print{body{margin:0;max-width:none}.noprint{display:none}@page{size:A4;margin:15mm}}
"""
"""The page's style sheet (inline: the report is one self-contained file)."""


@dataclass(frozen=True)
class Column:
    """A table column: key in the row, Spanish header, and whether it is a number."""

    key: str
    header: str
    numeric: bool = False


@dataclass(frozen=True)
class Table:
    """A table of the report, also written as ``DIR/<csv>``."""

    csv: str
    title: str
    columns: tuple[Column, ...]
    rows: Callable[[dict[str, Any]], list[dict[str, Any]]]


def _days(doc: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, label in (("baseline", "referencia"), ("operation", "operación")):
        for d in doc[name]["days"]:
            rows.append(
                {
                    "window": label,
                    **{k: v for k, v in d.items() if not isinstance(v, dict)},
                    "bot_hits": d["bots"]["hits"],
                    "bot_unique_visitors": d["bots"]["unique_visitors"],
                    "all_hits": d["all"]["hits"],
                    "all_unique_visitors": d["all"]["unique_visitors"],
                }
            )
    return rows


def _hours(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"window": label, **h}
        for name, label in (("baseline", "referencia"), ("operation", "operación"))
        for h in doc["hourly"][name]
    ]


def _pages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"window": label, **p}
        for name, label in (("operation", "operación"), ("baseline", "referencia"))
        for p in doc["top_pages"][name]
    ]


def _inc(key: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    def rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = doc.get("incidents", {}).get(key, [])
        if key == "rejected":
            return [{**r, "reason_es": REASONS_ES.get(r["reason"], r["reason"])} for r in items]
        if key == "other":
            return [{**r, "detail": json.dumps(r["detail"], ensure_ascii=False)} for r in items]
        if key == "stale":
            last = "tras el último corte"
            return [{**r, "note": last if r["after_last_cut"] else ""} for r in items]
        return items

    return rows


N = True
TABLES = (
    Table(
        "comparativo.csv",
        "Comparativo: promedio diario habitual frente a la operación del PREP",
        (
            Column("label", "Indicador"),
            Column("baseline_per_day", "Promedio diario habitual", N),
            Column("operation_per_day", "Promedio diario en la operación", N),
            Column("ratio", "Razón operación / habitual", N),
        ),
        lambda doc: doc["comparison"],
    ),
    Table(
        "dias.csv",
        "Cifras por día",
        (
            Column("window", "Periodo"),
            Column("date", "Fecha"),
            Column("visits", "Visitas", N),
            Column("pages", "Páginas", N),
            Column("hits", "Hits", N),
            Column("unique_visitors", "Visitantes únicos", N),
            Column("bytes", "Bytes", N),
            Column("bot_hits", "Hits de robots", N),
            Column("all_hits", "Hits totales (con robots)", N),
            Column("all_unique_visitors", "Visitantes únicos totales", N),
        ),
        _days,
    ),
    Table(
        "horas.csv",
        "Cifras por hora",
        (
            Column("window", "Periodo"),
            Column("hour", "Hora"),
            Column("visits", "Visitas", N),
            Column("pages", "Páginas", N),
            Column("hits", "Hits", N),
            Column("bot_hits", "Hits de robots", N),
            Column("errors_5xx", "Errores 5xx", N),
        ),
        _hours,
    ),
    Table(
        "paginas.csv",
        "Páginas más consultadas",
        (Column("window", "Periodo"), Column("page", "Página"), Column("pages", "Consultas", N)),
        _pages,
    ),
    Table(
        "estados.csv",
        "Códigos de estado HTTP (hits)",
        (
            Column("status", "Código"),
            Column("baseline", "Habitual", N),
            Column("operation", "Operación", N),
        ),
        lambda doc: doc["status"],
    ),
    Table(
        "cortes.csv",
        "Línea de tiempo de los cortes",
        (
            Column("sequence", "Secuencia", N),
            Column("cut_time", "Fecha y hora de corte"),
            Column("received", "Recibido"),
            Column("published", "Publicado"),
            Column("delay_s", "Corte → publicación (s)", N),
            Column("total_ms", "Verificación y publicación (ms)", N),
            Column("release", "Versión publicada"),
        ),
        _inc("cuts"),
    ),
    Table(
        "rechazos.csv",
        "Cortes rechazados",
        (
            Column("time", "Hora"),
            Column("sequence", "Secuencia", N),
            Column("reason", "Motivo"),
            Column("reason_es", "Motivo (descripción)"),
            Column("detail", "Detalle"),
        ),
        _inc("rejected"),
    ),
    Table(
        "desactualizacion.csv",
        "Periodos de publicación desactualizada (sin corte nuevo)",
        (
            Column("start", "Inicio"),
            Column("end", "Fin"),
            Column("seconds", "Duración (s)", N),
            Column("note", "Nota"),
        ),
        _inc("stale"),
    ),
    Table(
        "caidas_agente.csv",
        "Periodos sin agente en ejecución",
        (
            Column("start", "Inicio"),
            Column("end", "Fin"),
            Column("seconds", "Duración (s)", N),
            Column("cause", "Causa"),
        ),
        _inc("downtime"),
    ),
    Table(
        "otros_eventos.csv",
        "Otros eventos del agente",
        (Column("time", "Hora"), Column("event", "Evento"), Column("detail", "Detalle")),
        _inc("other"),
    ),
    Table(
        "ataques_por_hora.csv",
        "Ataques y contención por hora (bitácoras de nginx y fail2ban)",
        (
            Column("hour", "Hora"),
            Column("rate_limited", "Solicitudes limitadas (429)", N),
            Column("rate_limited_clients", "Clientes limitados", N),
            Column("waf_blocks", "Solicitudes bloqueadas por el cortafuegos", N),
            Column("waf_clients", "Clientes bloqueados", N),
            Column("bans", "Bloqueos de dirección (fail2ban)", N),
        ),
        lambda doc: doc.get("edge", {}).get("hourly", []),
    ),
    Table(
        "bloqueos_fail2ban.csv",
        "Direcciones bloqueadas por fail2ban",
        (
            Column("jail", "Regla"),
            Column("address", "Dirección"),
            Column("start", "Inicio"),
            Column("end", "Fin"),
            Column("seconds", "Duración (s)", N),
        ),
        lambda doc: doc.get("edge", {}).get("bans", []),
    ),
    Table(
        "lineas_invalidas.csv",
        "Ejemplos de líneas no reconocidas en las bitácoras",
        (Column("file", "Archivo"), Column("line", "Línea", N), Column("text", "Texto")),
        lambda doc: doc["input"]["garbage_samples"],
    ),
)
"""Every table of the report, in page order."""


def write_csvs(doc: dict[str, Any], out: Path) -> list[str]:
    """Write one CSV (UTF-8, header row of column keys) per table; return the names.

    Text cells that could run as spreadsheet formulas (log lines, journal details)
    are prefixed with ``'`` (``csv_safe``); numbers are written as numbers.
    """
    names = []
    for table in TABLES:
        with open(out / table.csv, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow([c.key for c in table.columns])
            for row in table.rows(doc):
                values = [row.get(c.key) for c in table.columns]
                writer.writerow([csv_safe("" if v is None else v) for v in values])
        names.append(table.csv)
    return names


def write_summary(doc: dict[str, Any], out: Path) -> None:
    """Write summary.json (without the hourly rows, which are in horas.csv)."""
    slim = {k: v for k, v in doc.items() if k != "hourly"}
    (out / "summary.json").write_text(
        json.dumps(slim, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def _fmt(value: Any, numeric: bool) -> str:
    if value is None:
        return "–"
    if numeric and isinstance(value, (int, float)):
        text = f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"
        return text.replace(",", "\u202f")
    return html.escape(str(value))


def render_table(table: Table, doc: dict[str, Any]) -> str:
    """One table as HTML (a 'sin registros' line when empty)."""
    rows = table.rows(doc)
    parts = [f"<h3>{html.escape(table.title)}</h3>"]
    if not rows:
        parts.append('<p class="muted">Sin registros.</p>')
        return "\n".join(parts)
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in table.columns)
    body = []
    for row in rows:
        cells = "".join(
            f'<td class="n">{_fmt(row.get(c.key), True)}</td>'
            if c.numeric
            else f"<td>{_fmt(row.get(c.key), False)}</td>"
            for c in table.columns
        )
        body.append(f"<tr>{cells}</tr>")
    parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    parts.append(f'<p class="muted">CSV: {html.escape(table.csv)}</p>')
    return "\n".join(parts)


def _when(text: str) -> str:
    t = datetime.fromisoformat(text)
    offset = t.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset else 0
    zone = f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}"
    zone += f":{abs(minutes) % 60:02d}" if minutes % 60 else ""
    return f"{t:%d/%m/%Y %H:%M} h (UTC{zone})"


def render_html(doc: dict[str, Any], comments: str, generated: str) -> str:
    """The whole report page (Spanish, self-contained, print-ready)."""
    tables = {t.csv: t for t in TABLES}
    win = doc["windows"]
    avail = doc["availability"]
    inp = doc["input"]
    esc = html.escape
    sections = [
        f"<h1>Memoria técnica del difusor del PREP</h1>"
        f'<p class="muted">Generada el {esc(generated)} por prep-agent report.</p>',
        "<h2>1. Periodos analizados</h2>"
        f"<p>Operación del PREP: del {_when(win['operation']['from'])} al "
        f"{_when(win['operation']['to'])}.<br>Referencia (tráfico habitual del portal): del "
        f"{_when(win['baseline']['from'])} al {_when(win['baseline']['to'])}.</p>"
        f"<p>Bitácoras leídas: {len(inp['files'])} archivo(s), {inp['lines']:,} líneas; "
        f"{inp['garbage_lines']:,} líneas no reconocidas; {inp['outside_windows']:,} fuera de "
        "ambos periodos.</p>".replace(",", "\u202f"),
        "<h2>2. Comparativo de visitas, páginas y hits</h2>",
        render_table(tables["comparativo.csv"], doc),
        '<div class="chart">'
        + report_charts.daily_chart({n: doc[n]["days"] for n in ("baseline", "operation")})
        + "</div>",
        '<div class="chart">'
        + report_charts.hourly_chart(doc["hourly"]["operation"], "Operación del PREP, por hora")
        + "</div>",
        '<div class="chart">'
        + report_charts.hourly_chart(doc["hourly"]["baseline"], "Referencia, por hora")
        + "</div>",
        render_table(tables["dias.csv"], doc),
        "<h2>3. Páginas y códigos de estado</h2>",
        render_table(tables["paginas.csv"], doc),
        render_table(tables["estados.csv"], doc),
        "<h2>4. Disponibilidad</h2>",
        _availability_html(avail),
        "<h2>5. Reporte de incidencias</h2>",
        _incidents_intro(doc),
        render_table(tables["rechazos.csv"], doc),
        render_table(tables["desactualizacion.csv"], doc),
        render_table(tables["caidas_agente.csv"], doc),
        render_table(tables["otros_eventos.csv"], doc),
        "<h3>Ataques y contención</h3>",
        _edge_intro(doc),
        render_table(tables["ataques_por_hora.csv"], doc),
        render_table(tables["bloqueos_fail2ban.csv"], doc),
        "<h2>6. Línea de tiempo de los cortes</h2>",
        render_table(tables["cortes.csv"], doc),
        "<h2>7. Definiciones</h2>",
        "<dl class=defs>"
        + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in doc["definitions"].items())
        + "</dl>",
        render_table(tables["lineas_invalidas.csv"], doc),
        "<h2>8. Comentarios y sugerencias</h2>"
        '<p class="muted noprint">Sección editable: escriba aquí antes de imprimir.</p>'
        f'<div class="comments" contenteditable="true">{esc(comments)}</div>',
    ]
    return (
        '<!DOCTYPE html>\n<html lang="es-MX"><head><meta charset="utf-8">'
        "<title>Memoria técnica del difusor del PREP</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def _availability_html(avail: dict[str, Any]) -> str:
    rows = [
        ("Respuestas sin error de servidor (no 5xx)", avail.get("http_success_pct"), "%"),
        ("Respuestas 5xx", avail.get("http_5xx"), ""),
        (
            "Tiempo con publicación al día (entre el primer y el último corte)",
            avail.get("fresh_pct"),
            "%",
        ),
        ("Tiempo desactualizado (s)", avail.get("stale_seconds"), ""),
        ("Tiempo con el agente en ejecución", avail.get("agent_up_pct"), "%"),
        ("Tiempo sin agente (s)", avail.get("agent_down_seconds"), ""),
        ("Cortes publicados", avail.get("cuts_published"), ""),
        ("Cortes rechazados", avail.get("cuts_rejected"), ""),
    ]
    body = "".join(
        f"<tr><td>{html.escape(label)}</td>"
        f"<td class=n>{_fmt(v, True)}{unit if v is not None else ''}</td></tr>"
        for label, v, unit in rows
    )
    return f"<table><tbody>{body}</tbody></table>"


def _incidents_intro(doc: dict[str, Any]) -> str:
    inc = doc.get("incidents")
    if inc is None:
        return '<p class="muted">No se proporcionó la bitácora del agente (--journal).</p>'
    lat = inc["latency"]
    return (
        f"<p>Eventos en la bitácora del agente: {inc['journal_events']}. Un corte se considera "
        f"desactualizado cuando no llega uno nuevo en {inc['stale_periods']} × "
        f"{inc['period_seconds']} s después de su fecha y hora de corte firmada.</p>"
        f"<p>Latencia de publicación (verificación + copia + cambio): mediana "
        f"{_fmt(lat['total_ms_p50'], True)} ms, p95 {_fmt(lat['total_ms_p95'], True)} ms, "
        f"máxima {_fmt(lat['total_ms_max'], True)} ms. De la hora de corte a la publicación: "
        f"mediana {_fmt(lat['delay_s_p50'], True)} s, p95 {_fmt(lat['delay_s_p95'], True)} s, "
        f"máxima {_fmt(lat['delay_s_max'], True)} s.</p>"
    )


def _edge_intro(doc: dict[str, Any]) -> str:
    edge = doc.get("edge")
    if edge is None:
        return (
            '<p class="muted">No se proporcionaron las bitácoras de errores de nginx ni de '
            "fail2ban (--error-log, --fail2ban-log).</p>"
        )
    tot = edge["totals"]
    return (
        f"<p>Durante la operación, los límites por cliente rechazaron "
        f"{_fmt(tot['rate_limited'], True)} solicitudes, el cortafuegos de aplicaciones "
        f"bloqueó {_fmt(tot['waf_blocks'], True)} y fail2ban bloqueó direcciones "
        f"{_fmt(tot['bans'], True)} veces ({_fmt(tot['clients'], True)} clientes distintos "
        "involucrados). Cada bloqueo de fail2ban dura un tiempo acotado.</p>"
    )
