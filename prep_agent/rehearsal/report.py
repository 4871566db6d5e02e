"""The rehearsal report: the verdict, ``rehearsal.json`` and ``rehearsal.html`` (Spanish).

The verdict fails when a viewer saw a mixed or altered page, a cut time that
went backwards, a cut not signed by the institute, an error from a difusor not
under a fault, or a missing interruption notice (not held against a difusor
whose agent was killed or whose disk was full); when an accepted cut is
missing from the journal of a difusor that was not under a fault then; when the
final cut is missing anywhere at the end; when a fault was not detected where
the spec says; when a copy was found altered (a ``tamper`` defect); and when
the simulated frames' HTTP load (``load.py``) saw an error answer (judged as a
viewer's) or a cut that went backwards.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prep_agent.rehearsal.browser import Browser
from prep_agent.rehearsal.load import Load
from prep_agent.rehearsal.pair import NAME as PAIR
from prep_agent.rehearsal.viewer import NOTICE_GRACE, Finding, Viewer

LATENCY = {
    "delivery": "delivered",
    "publish": "published",
    "visible": "first_seen",
    "visible_browser": "first_seen_browser",
}
"""Latency measure → the time of a cut it is measured to (from when the cut was ready)."""
EXPECTED_ES = {
    "kill-agent": "el agente reinicia y publica el corte (o uno más nuevo)",
    "disk-full": "distribute registra el envío fallido (o el agente un error); "
    "al liberar espacio se publica el corte más reciente",
    "network-cut": "el colector lo marca y lo quita de la lista de difusores vigentes; su marco "
    "muestra el aviso de interrupción cuando corresponde; al recuperarse vuelve a la lista",
    "bad-signature": "distribute rechaza el corte; todo difusor lo rechaza (firma no confiable)",
    "replay": "distribute rechaza el corte anterior; todo difusor lo rechaza (retroceso)",
    "tamper": "la auditoría del colector encuentra la copia alterada",
    "notice-off": "un visor encuentra que falta el aviso de interrupción cuando corresponde",
    "balancer-kill": "el keepalived del otro balanceador toma la dirección flotante; los lectores "
    "del par no ven errores después de la ventana de conmutación (medida)",
    "origin-stop": "HAProxy saca al origen detenido y el colector no logra consultarlo; los "
    "lectores del par no ven errores; al reiniciar publica el corte más reciente",
    "clock-skew": "el colector rechaza sus reportes de salud (hora fuera de ±300 s) y el agente "
    "rechaza los cortes nuevos como futuros (hora inválida); con el reloj corregido publica "
    "el siguiente corte",
}
"""What each fault should cause, for the Spanish page."""
STATUS_ES = {"detected": "detectada", "missed": "no detectada", "not-available": "no disponible"}
MEASURE_ES = {
    "delivery": "entrega (sftp)",
    "publish": "publicación",
    "visible": "visible (consulta HTTP)",
    "visible_browser": "visible (navegador)",
}
ALWAYS_WRONG = {"mixed", "unsigned", "backwards"}
"""Viewer findings that fail the verdict even under a fault."""
NOTICE_EXCUSED_BY = {"kill-agent", "disk-full", "clock-skew"}
"""Faults in whose window a missing notice is excused: a full disk cannot take the
rewritten status.json, a killed agent rewrites nothing, an agent whose clock is
behind thinks its cut younger than it is. Not a network cut: the
agent is fine then, and showing the notice is the point."""
KIND_ES = {
    "kill-agent": "kill -9 del agente durante la publicación",
    "disk-full": "disco lleno",
    "network-cut": "red cortada 3+ periodos",
    "bad-signature": "corte mal firmado",
    "replay": "corte repetido (replay)",
    "tamper": "copia alterada (defecto)",
    "notice-off": "aviso de interrupción desactivado (defecto)",
    "clock-skew": "reloj desfasado",
    "balancer-kill": "balanceador activo detenido",
    "origin-stop": "origen del par detenido",
}


def iso(at: float | None) -> str | None:
    """An epoch time as RFC 3339 UTC with milliseconds (None stays None)."""
    if at is None:
        return None
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds")


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile ``q`` (0-100) of ``values``, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return round(ordered[rank - 1], 3)


def excused(
    records: dict[str, Any], service_id: str, at: float, kinds: set[str] | None = None
) -> bool:
    """Whether ``service_id`` was under a fault (of ``kinds``, None: any) at ``at``:
    from one period before the fault (or from the cut before the fault's cut, which
    may still have been in flight) to two periods after its recovery; for a fault
    with a ``strict_window`` (a balancer killed), only within the window. The HA
    pair is excused before its floating address first served a cut (no origin
    held one: HAProxy answers 503 by design) and for the ``FRAME_POLL`` seconds a
    frame that loaded that 503 takes to load again."""
    return any(start <= at <= end for start, end in excused_windows(records, service_id, kinds))


def excused_windows(
    records: dict[str, Any], service_id: str, kinds: set[str] | None = None
) -> list[tuple[float, float]]:
    """The intervals in which ``service_id`` is excused (``excused``)."""
    period = float(records["options"]["period"])
    pair = records.get("pair")
    found = []
    if pair and service_id == PAIR:
        found.append((float(records["started"]), float(pair.get("ready_at") or 0) + FRAME_POLL))
    for fault in records["faults"]:
        window = fault.get("window")
        if fault.get("difusor") != service_id or not window:
            continue
        if kinds is not None and fault["kind"] not in kinds:
            continue
        start = min(window[0] - period, records["placed"].get(fault["at_cut"] - 1, window[0]))
        end = window[1] + 2 * period
        if fault.get("strict_window"):
            start, end = window
        found.append((start, end))
    return found


def judge_findings(
    records: dict[str, Any], who: str, sid: str, found: list[Finding], problems: list[str]
) -> list[dict[str, Any]]:
    """Add the findings of one viewer that fail the verdict to ``problems`` (once
    per kind); return them all as JSON."""
    counted = [
        f
        for f in found
        if f.kind in ALWAYS_WRONG
        or not excused(records, sid, f.at, NOTICE_EXCUSED_BY if f.kind == "notice" else None)
    ]
    for kind in sorted({f.kind for f in counted}):
        same = [f for f in counted if f.kind == kind]
        problems.append(
            f"{who} of {sid}: {kind} ({len(same)} times, first at {iso(same[0].at)}: "
            f"{same[0].detail})"
        )
    return [{"at": iso(f.at), "kind": f.kind, "detail": f.detail} for f in found]


def browser_part(records: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The browser viewer's summary; its failures go to ``problems``."""
    browser: Browser | None = records["browser"]
    if browser is None:
        return {"ran": False, "why": records["browser_unavailable"]}
    if browser.error:
        problems.append(f"browser viewer: {browser.error}")
    return {
        "ran": True,
        "error": browser.error,
        "screenshot": "navegador/portal.png",
        "samples": {f.service_id: f.samples for f in browser.frames},
        "findings": {
            f.service_id: judge_findings(records, "browser", f.service_id, f.findings, problems)
            for f in browser.frames
        },
    }


FRAME_POLL = 5.0
"""Seconds between a frame's looks at status.json (the agents' ``poll_seconds``)."""


def notices_part(records: dict[str, Any], problems: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Per difusor, every interruption notice that came due: when, and when the HTTP
    viewer and the browser first showed it. A frame still showing the cut as
    current ``FRAME_POLL`` + ``NOTICE_GRACE`` seconds after it was due is a
    missing notice (the HTTP viewer's own are among its findings)."""
    viewers: dict[str, Viewer] = records["viewers"]
    browser: Browser | None = records["browser"]
    frames = {f.service_id: f for f in browser.frames} if browser is not None else {}
    found: dict[str, list[dict[str, Any]]] = {}
    for sid, viewer in viewers.items():
        entries = []
        for sequence, notice in sorted(viewer.notices.items()):
            due = float(notice["due"] or 0)
            frame = frames.get(sid)
            late = frame.last_current.get(sequence) if frame is not None else None
            if (
                late is not None
                and late > due + FRAME_POLL + NOTICE_GRACE
                and not excused(records, sid, late, NOTICE_EXCUSED_BY)
            ):
                problems.append(f"browser of {sid}: notice of cut {sequence} due at {iso(due)} "
                                f"still not shown at {iso(late)}")  # fmt: skip
            entries.append({
                "sequence": sequence,
                "due_at": iso(due),
                "shown_at": iso(notice["shown"]),
                "shown_browser_at": iso(frame.stale_shown.get(sequence)) if frame else None,
            })  # fmt: skip
        found[sid] = entries
    return found


def load_part(records: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The simulated frames' HTTP load per difusor: its figures, latency p50/p99 (ms)
    and findings; the findings that fail the verdict go to ``problems``, judged as
    a viewer's (errors inside a fault's window excused, backwards never)."""
    loads: dict[str, Load] = records.get("load") or {}
    found: dict[str, Any] = {}
    for sid, load in loads.items():
        millis = [t * 1000 for t in load.latencies]
        found[sid] = {
            **load.figures(),
            "latency_ms": {"p50": percentile(millis, 50), "p99": percentile(millis, 99)},
            "findings": judge_findings(records, "load", sid, load.findings, problems),
        }
    return {"readers": records["options"].get("readers", 0), "difusores": found}


def build(records: dict[str, Any]) -> dict[str, Any]:
    """The report document, verdict included."""
    viewers: dict[str, Viewer] = records["viewers"]
    browser: Browser | None = records["browser"]
    frames = {f.service_id: f for f in browser.frames} if browser is not None else {}
    journals: dict[str, dict[int, float]] = records["journals"]
    placed: dict[int, float] = records["placed"]
    problems: list[str] = []
    cuts: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {
        "delivery": [],
        "publish": [],
        "visible": [],
        "visible_browser": [],
    }
    for k, at in sorted(placed.items()):
        per: dict[str, Any] = {}
        for sid, published in journals.items():
            times = {
                "delivered": records["deliveries"].get((sid, k)),
                "published": published.get(k),
                "first_seen": viewers[sid].first_seen.get(k),
                "first_seen_browser": frames[sid].first_seen.get(k) if sid in frames else None,
            }
            per[sid] = {name: iso(value) for name, value in times.items()}
            for name, key in LATENCY.items():
                value = times[key]
                if value is not None:
                    latencies[name].append(value - at)
            if k not in published and not excused(records, sid, at):
                problems.append(f"cut {k} missing from the journal of healthy difusor {sid}")
        cuts.append({"sequence": k, "placed": iso(at), "difusores": per})
    final = max(placed) if placed else None
    for sid, published in journals.items():
        if final is not None and final not in published:
            problems.append(f"the final cut {final} is not published by {sid}")
    findings = {
        sid: judge_findings(records, "viewer", sid, viewer.findings, problems)
        for sid, viewer in viewers.items()
    }
    browser_doc = browser_part(records, problems)
    notices = notices_part(records, problems)
    load = load_part(records, problems)
    faults = []
    for fault in records["faults"]:
        entry = {**fault, "injected_at": iso(fault["injected_at"]),
                 "detected_at": iso(fault["detected_at"])}  # fmt: skip
        for moment in ("relinked_at", "notice_shown_at", "caught_up_at"):
            if fault.get(moment) is not None:
                entry[moment] = iso(fault[moment])
        if fault["injected_at"] is not None and fault["detected_at"] is not None:
            entry["detection_seconds"] = round(fault["detected_at"] - fault["injected_at"], 3)
        if fault.get("window"):
            entry["window"] = [iso(t) for t in fault["window"]]
        faults.append(entry)
        if fault["status"] not in ("detected", "not-available"):  # missed, or still running
            problems.append(f"fault {fault['kind']} ({fault.get('difusor') or '-'}) not detected: "
                            f"{fault['detail']}")  # fmt: skip
        elif fault["kind"] == "tamper":
            problems.append(f"the public copy of {fault['difusor']} was found altered")
    pair = pair_part(records, problems)
    stats = {name: {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
             for name, v in latencies.items()}  # fmt: skip
    return {
        "verdict": "fail" if problems else "pass",
        "problems": problems,
        "options": records["options"],
        "started": iso(records["started"]),
        "ended": iso(records["ended"]),
        "difusores": [
            {
                **d,
                "memoria": records["memorias"].get(d["service_id"]),
                "viewer_polls": viewers[d["service_id"]].polls,
                "viewer_timeouts": viewers[d["service_id"]].timeouts,
            }
            for d in records["difusores"]
        ],  # fmt: skip
        "ha_pair": pair,
        "cuts": cuts,
        "latency_seconds": stats,
        "faults": faults,
        "viewer_findings": findings,
        "notices": notices,
        "browser": browser_doc,
        "load": load,
        "collector_timeline": [
            {"at": iso(s["at"]), "difusores": s["difusores"]} for s in records["timeline"]
        ],  # fmt: skip
    }


PURGE_DELAY = 1.5
"""Seconds after a swap an origin soft-purges the pair's Varnish nodes (``web/purge.py``):
a cut shows through the floating address that much after its origins had it."""
PAIR_MIN_NEWEST = 1.5
"""Seconds a cut must be the pair's newest for its HTTP viewer (a look every 0.5 s; the
first look after a soft purge still gets the old copy) to be sure to see it."""


def longest_outside(span: tuple[float, float], windows: list[tuple[float, float]]) -> float:
    """The longest part of ``span`` (seconds) outside every one of ``windows``."""
    pieces = [span]
    for start, end in windows:
        pieces = [
            piece
            for a, b in pieces
            for piece in (((a, b),) if end <= a or b <= start else ((a, start), (end, b)))
            if piece[1] > piece[0]
        ]
    return max((b - a for a, b in pieces), default=0.0)


def pair_unseen(records: dict[str, Any], problems: list[str]) -> list[dict[str, Any]]:
    """The cuts the pair published that its HTTP viewer never saw, each with its
    excuse: replaced within ``PAIR_MIN_NEWEST`` s, or shown through the floating
    address (from the purge after it to the purge after its successor) for less
    than that outside the pair's excused windows (before it first served a cut, a
    balancer killed). One without an excuse goes to ``problems``."""
    viewer: Viewer | None = records["viewers"].get(PAIR)
    published: dict[int, float] = records["journals"].get(PAIR, {})
    if not records.get("pair") or viewer is None:
        return []
    windows = excused_windows(records, PAIR)
    unseen = []
    for k, at in sorted(published.items()):
        if k in viewer.first_seen:
            continue
        until = min((t for j, t in published.items() if j > k), default=records["ended"])
        newest = max(0.0, until - at)
        outside = longest_outside((at + PURGE_DELAY, until + PURGE_DELAY), windows)
        excuse = None
        if newest < PAIR_MIN_NEWEST:
            excuse = f"replaced after {newest:.1f} s"
        elif outside < PAIR_MIN_NEWEST:
            excuse = f"newest within an excused window of the pair but for {outside:.1f} s"
        else:
            problems.append(
                f"viewer of {PAIR}: cut {k} never seen (the pair's newest for {newest:.1f} s "
                f"from {iso(at)}, outside every excused window)"
            )
        unseen.append({"sequence": k, "newest_seconds": round(newest, 3), "excused": excuse})
    return unseen


def pair_part(records: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """The HA pair's part of the report (or why it did not run); the cuts its
    viewer missed without an excuse go to ``problems``."""
    pair = records.get("pair")
    if not pair:
        return {"ran": False, "why": records.get("pair_unavailable")}
    unseen = pair_unseen(records, problems)
    return {"ran": True, **pair, "ready_at": iso(pair.get("ready_at")), "unseen": unseen}


def _cell(value: object) -> str:
    return html.escape("—" if value is None else str(value))


def pair_line(pair: dict[str, Any]) -> str:
    """One Spanish sentence on the HA pair."""
    if not pair["ran"]:
        return f"Par de alta disponibilidad: no se ejecutó ({pair['why']})."
    return (
        f"Par de alta disponibilidad {PAIR}: orígenes {', '.join(pair['origins'])} detrás de "
        f"los balanceadores {', '.join(pair['balancers'])} (HAProxy, Varnish y keepalived con "
        f"la configuración distribuida), dirección flotante {pair['vip']}."
    )


def load_table(load: dict[str, Any]) -> str:
    """The Spanish table of the simulated frames' HTTP load (escaped)."""
    if not load["difusores"]:
        return "<p>No se simularon lectores (<code>--readers 0</code>).</p>"
    rows = "".join(
        f"<tr><td>{_cell(sid)}</td><td>{d['readers']}</td><td>{_cell(d['poll_seconds'])}</td>"
        f"<td>{d['requests']}</td><td>{_cell(d['requests_per_second'])}</td>"
        f"<td>{sum(n for code, n in d['answers'].items() if not code.startswith('2'))}</td>"
        f"<td>{d['no_answer']}</td><td>{_cell(d['latency_ms']['p50'])}</td>"
        f"<td>{_cell(d['latency_ms']['p99'])}</td><td>{len(d['findings'])}</td></tr>"
        for sid, d in load["difusores"].items()
    )
    return (
        "<p>Cada lector simula un marco: su propia conexión persistente, consulta "
        "status.json cada periodo y pide la página de entrada de cada corte nuevo. Los "
        "errores dentro de la ventana de una falla inyectada se excusan, como los de los "
        "visores; los que cuentan aparecen en «Problemas».</p>"
        "<table><tr><th>difusor</th><th>lectores</th><th>consulta cada (s)</th>"
        "<th>consultas</th><th>consultas/s</th><th>errores (no 2xx)</th><th>sin respuesta</th>"
        "<th>latencia p50 (ms)</th><th>latencia p99 (ms)</th><th>hallazgos</th></tr>"
        f"{rows}</table>"
    )


def render(doc: dict[str, Any]) -> str:
    """The report as one Spanish HTML page (every value escaped)."""
    ok = doc["verdict"] == "pass"
    rows = []
    for cut in doc["cuts"]:
        for sid, v in cut["difusores"].items():
            rows.append(f"<tr><td>{cut['sequence']}</td><td>{_cell(sid)}</td><td>{_cell(cut['placed'])}</td>"
                        f"<td>{_cell(v['delivered'])}</td><td>{_cell(v['published'])}</td>"
                        f"<td>{_cell(v['first_seen'])}</td>"
                        f"<td>{_cell(v['first_seen_browser'])}</td></tr>")  # fmt: skip
    faults = [
        f"<tr><td>{_cell(KIND_ES.get(f['kind'], f['kind']))}</td><td>{_cell(f['difusor'])}</td>"
        f"<td>{_cell(f['injected_at'])}</td><td>{_cell(EXPECTED_ES.get(f['kind']))}</td>"
        f"<td>{_cell(f['detected_at'])}</td><td>{_cell(f['detected_by'])}</td>"
        f"<td>{_cell(STATUS_ES.get(f['status'], f['status']))}</td>"
        f"<td>{_cell(f['detail'])}</td></tr>"
        for f in doc["faults"]
    ]
    problems = "".join(f"<li>{_cell(p)}</li>" for p in doc["problems"]) or "<li>Ninguno.</li>"
    stats = "".join(
        f"<tr><td>{_cell(MEASURE_ES.get(name, name))}</td><td>{_cell(s['p50'])}</td>"
        f"<td>{_cell(s['p99'])}</td><td>{s['n']}</td></tr>"
        for name, s in doc["latency_seconds"].items()
    )
    flags = "".join(
        f"<tr><td>{_cell(s['at'])}</td>"
        f"<td>{_cell(json.dumps(s['difusores'], ensure_ascii=False))}</td></tr>"
        for s in doc["collector_timeline"]
    )
    notice_rows = (
        "".join(
            f"<tr><td>{_cell(sid)}</td><td>{n['sequence']}</td><td>{_cell(n['due_at'])}</td>"
            f"<td>{_cell(n['shown_at'])}</td><td>{_cell(n['shown_browser_at'])}</td></tr>"
            for sid, entries in doc["notices"].items()
            for n in entries
        )
        or '<tr><td colspan="5">Ningún aviso correspondió.</td></tr>'
    )
    verdict = "APROBADO" if ok else "NO APROBADO"
    b = doc["browser"]
    browser_line = (
        f"Chromium sin interfaz mostró el portal con los {len(b['samples'])} marcos; "
        f"muestras por difusor: {b['samples']}; captura: {b['screenshot']}."
        if b["ran"]
        else f"El visor en navegador no se ejecutó: {b['why']}."
    )
    return f"""<!doctype html>
<html lang="es-MX"><head><meta charset="utf-8"><title>Simulacro del PREP: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:2px 6px;font-size:13px}}
.v{{font-size:1.6em;color:{'#17692e' if ok else '#a00'}}}</style></head><body>
<h1>Simulacro de la noche del PREP</h1>
<p class="v">Veredicto: <strong>{verdict}</strong></p>
<p>Inicio {_cell(doc['started'])}, fin {_cell(doc['ended'])}; {len(doc['cuts'])} cortes, periodo de
{_cell(doc['options']['period'])} s; modo {_cell(doc['options']['mode'])}.
{_cell(pair_line(doc['ha_pair']))}
Los problemas y los detalles técnicos se muestran en inglés, como en las bitácoras.</p>
<h2>Problemas</h2><ul>{problems}</ul>
<h2>Latencias (segundos desde que el corte estuvo listo)</h2>
<table><tr><th>medida</th><th>p50</th><th>p99</th><th>n</th></tr>{stats}</table>
<h2>Fallas inyectadas</h2>
<table><tr><th>falla</th><th>difusor</th><th>inyectada</th><th>se esperaba</th><th>detectada</th>
<th>por</th><th>estado</th><th>detalle</th></tr>{''.join(faults)}</table>
<h2>Avisos de interrupción</h2>
<p>Cada corte simulado declara un periodo de {_cell(doc['options'].get('period_seconds'))} s y
se firma con una hora de corte {_cell(doc['options'].get('cut_age_seconds'))} s en el pasado,
así el aviso corresponde tras {_cell(doc['options'].get('notice_after_periods'))} periodos
comprimidos sin corte nuevo.</p>
<table><tr><th>difusor</th><th>corte</th><th>correspondía desde</th><th>mostrado (consulta
HTTP)</th><th>mostrado (navegador)</th></tr>{notice_rows}</table>
<h2>Cortes por difusor</h2>
<table><tr><th>corte</th><th>difusor</th><th>listo</th><th>entregado</th><th>publicado</th>
<th>visto por primera vez (consulta HTTP)</th><th>visto en el navegador</th></tr>
{''.join(rows)}</table>
<h2>Navegador</h2><p>{_cell(browser_line)}</p>
<h2>Carga HTTP de marcos simulados</h2>
{load_table(doc['load'])}
<h2>Indicadores del colector a lo largo del simulacro</h2>
<table><tr><th>hora</th><th>difusores</th></tr>{flags}</table>
</body></html>
"""


def write(out: Path, doc: dict[str, Any]) -> None:
    """``rehearsal.json`` and ``rehearsal.html`` in ``out``."""
    (out / "rehearsal.json").write_text(
        json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8"
    )
    (out / "rehearsal.html").write_text(render(doc), encoding="utf-8")
