"""The published site of a cut: its HTML pages, stylesheet and logo, and the whole tree."""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from prep_agent.core.errors import Error
from prep_agent.institute.simulation.count import Cut, Tally, make_cut
from prep_agent.institute.simulation.database import (
    CSV_NAME,
    CSV_PATH,
    csv_bytes,
    vote_cells,
    zip_bytes,
    zip_path,
)
from prep_agent.institute.simulation.election import (
    OPTION_LABELS,
    OPTIONS,
    VOTE_COLUMNS,
    Acta,
    Municipality,
    Simulation,
)

CSS_PATH = "css/prep.css"
LOGO_PATH = "img/logo-prep.svg"


def build_cut(
    sim: Simulation, sequence: int, cut_time: datetime, out: Path, final: bool = False
) -> None:
    """Write the publication tree of cut ``sequence`` into the new folder ``out``.

    The tree: ``index.html`` (state totals and the table of municipalities),
    ``municipios/<id>.html``, the CSS and logo (identical in every cut), the PREP
    database ``datos/COAH_AYUN_2021.csv`` and the delivery zip
    ``datos/YYYYMMDD_HHMM_PREP_AYUN_COAH.zip`` (CSV and ``LEEME.txt``), both
    stamped with ``cut_time`` in its own offset. Raises ``Error`` if ``out``
    exists and ValueError if ``cut_time`` is naive or ``sequence`` < 1.
    """
    cut = make_cut(sim, sequence, cut_time, final)
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        raise Error(f"cut folder {out} already exists") from None
    csv_data = csv_bytes(cut)
    files = {
        CSS_PATH: STYLESHEET.encode(),
        LOGO_PATH: LOGO_SVG.encode(),
        CSV_PATH: csv_data,
        zip_path(cut_time): zip_bytes(cut_time, csv_data),
        **_pages(cut),
    }
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)


def _pages(cut: Cut) -> dict[str, bytes]:
    """``index.html`` and one page per municipality."""
    state, per = cut.tallies()
    pages = {"index.html": _index_page(cut, state, per)}
    for muni in cut.election.municipalities:
        actas = [(a, t) for a, t in cut.captured if a.municipality == muni.id]
        pages[f"municipios/{muni.id}.html"] = _municipality_page(cut, muni, per[muni.id], actas)
    return {path: text.encode("utf-8") for path, text in pages.items()}


def _label(option: str) -> str:
    return OPTION_LABELS.get(option, option)


def _number(value: int) -> str:
    return f"{value:,}"


def _page(cut: Cut, title: str, body: str, root: str) -> str:
    """A complete page: header with logo and cut time, then ``body``."""
    kind = "Corte final" if cut.final else "Corte de información"
    stamp = cut.stamp.replace(" (", " h (")
    return (
        '<!doctype html>\n<html lang="es-MX">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)} · PREP Coahuila 2021 (simulación)</title>\n"
        f'<link rel="stylesheet" href="{root}{CSS_PATH}">\n</head>\n<body>\n'
        f'<header><a href="{root}index.html"><img src="{root}{LOGO_PATH}" alt="PREP" '
        'width="120" height="40"></a>\n<div><p class="eleccion">Programa de Resultados '
        "Electorales Preliminares · Coahuila 2021 · Ayuntamientos</p>\n"
        f'<p class="corte">{kind}: <strong>{stamp}</strong></p></div></header>\n'
        '<p class="aviso">Simulación con datos ficticios para pruebas del difusor; '
        "no son resultados oficiales.</p>\n<main>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}</main>\n</body>\n</html>\n"
    )


def _progress(tally: Tally) -> str:
    """The actas and participation summary of a tally."""
    return (
        '<dl class="avance">\n'
        f"<dt>Actas capturadas</dt><dd>{_number(tally.captured)} de "
        f"{_number(tally.expected)} esperadas ({tally.percent(tally.captured)} %)</dd>\n"
        f"<dt>Actas contabilizadas</dt><dd>{_number(tally.counted)} "
        f"({tally.percent(tally.counted)} %)</dd>\n"
        f"<dt>Participación ciudadana</dt><dd>{tally.participation()} %</dd>\n</dl>\n"
    )


def _votes_table(tally: Tally, runs: Sequence[bool]) -> str:
    """Votes per option, candidacies not registered, null votes and the total."""
    rows = []
    for i, column in enumerate(VOTE_COLUMNS):
        if i < len(OPTIONS) and not runs[i]:
            continue
        label = {"NO_REGISTRADOS": "Candidaturas no registradas", "NULOS": "Votos nulos"}.get(
            column, _label(column)
        )
        share = 100 * tally.votes[i] / tally.total if tally.total else 0.0
        rows.append(
            f"<tr><th>{html.escape(label)}</th><td>{_number(tally.votes[i])}</td>"
            f"<td>{share:.4f} %</td></tr>"
        )
    rows.append(
        f'<tr class="total"><th>Total</th><td>{_number(tally.total)}</td><td>100 %</td></tr>'
    )
    return (
        '<table class="votos">\n<thead><tr><th>Partido, coalición o candidatura</th>'
        "<th>Votos</th><th>Porcentaje</th></tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>\n"
    )


def _leader(tally: Tally) -> str:
    """The option ahead in a tally, or a dash while nothing is counted."""
    votes = tally.votes[: len(OPTIONS)]
    if not any(votes):
        return "—"
    return _label(OPTIONS[votes.index(max(votes))])


def _index_page(cut: Cut, state: Tally, per: dict[int, Tally]) -> str:
    """The entry page: state totals and the table of municipalities."""
    rows = "\n".join(
        f'<tr><td>{m.id}</td><td><a href="municipios/{m.id}.html">{html.escape(m.name)}</a></td>'
        f"<td>{_number(per[m.id].expected)}</td><td>{_number(per[m.id].captured)}</td>"
        f"<td>{per[m.id].percent(per[m.id].captured)} %</td>"
        f"<td>{_number(per[m.id].counted)}</td><td>{html.escape(_leader(per[m.id]))}</td></tr>"
        for m in cut.election.municipalities
    )
    body = (
        _progress(state)
        + "<h2>Votos en el estado</h2>\n"
        + _votes_table(state, [True] * len(OPTIONS))
        + '<h2>Municipios</h2>\n<table class="municipios">\n<thead><tr><th>Clave</th>'
        "<th>Municipio</th><th>Actas esperadas</th><th>Actas capturadas</th>"
        "<th>Porcentaje</th><th>Actas contabilizadas</th><th>Primer lugar</th></tr></thead>\n"
        f"<tbody>\n{rows}\n</tbody>\n</table>\n"
        "<h2>Base de datos</h2>\n<ul>\n"
        f'<li><a href="{CSV_PATH}">{CSV_NAME}</a> (CSV, UTF-8)</li>\n'
        f'<li><a href="{zip_path(cut.cut_time)}">{zip_path(cut.cut_time)[6:]}</a> '
        "(CSV y LEEME en zip)</li>\n</ul>\n"
    )
    return _page(cut, "Ayuntamientos: resultados en el estado", body, "")


def _municipality_page(
    cut: Cut, muni: Municipality, tally: Tally, actas: list[tuple[Acta, datetime]]
) -> str:
    """A municipality's totals and its captured actas, casilla by casilla."""
    columns = [i for i, runs in enumerate([*muni.options, True, True]) if runs]
    head = "".join(f"<th>{html.escape(VOTE_COLUMNS[i])}</th>" for i in columns)
    rows = []
    for acta, _ in actas:
        cells = vote_cells(acta, muni)
        votes = "".join(f"<td>{html.escape(cells[i])}</td>" for i in columns)
        state = "Contabilizada" if acta.counted else "No contabilizada"
        note = f" ({acta.problem.capitalize()})" if acta.problem else ""
        rows.append(
            f"<tr><td>{acta.section:04d}</td><td>{acta.kind}{acta.number}"
            f"{'-' + str(acta.ext) if acta.ext else ''}</td>{votes}<td>{cells[-1]}</td>"
            f"<td>{state}{html.escape(note)}</td></tr>"
        )
    body = (
        _progress(tally)
        + _votes_table(tally, muni.options)
        + f'<h2>Actas capturadas ({_number(len(actas))})</h2>\n<table class="actas">\n'
        f"<thead><tr><th>Sección</th><th>Casilla</th>{head}<th>Total</th><th>Estado del acta</th>"
        f"</tr></thead>\n<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>\n"
        '<p><a href="../index.html">Volver a los resultados del estado</a></p>\n'
    )
    return _page(cut, f"{muni.id}. {muni.name}", body, "../")


STYLESHEET = """\
body { margin: 0; font-family: system-ui, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; }
header { display: flex; gap: 1.5rem; align-items: center; padding: .75rem 1.5rem;
  background: #5b2c6f; color: #fff; }
header p { margin: .15rem 0; }
.aviso { margin: 0; padding: .4rem 1.5rem; background: #fff3cd; font-size: .9rem; }
main { padding: 1rem 1.5rem 3rem; max-width: 72rem; }
h1 { font-size: 1.5rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; }
dl.avance { display: grid; grid-template-columns: max-content auto; gap: .25rem 1rem; }
dl.avance dt { font-weight: 600; }
dl.avance dd { margin: 0; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:nth-child(2) { text-align: left; }
thead th { background: #f2eef5; }
tr.total th, tr.total td { font-weight: 700; }
table.actas { display: block; overflow-x: auto; }
"""
"""The site's stylesheet (identical in every cut)."""

LOGO_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40" viewBox="0 0 120 40">
<rect width="120" height="40" rx="6" fill="#ffffff"/>
<rect x="8" y="14" width="22" height="18" rx="2" fill="#5b2c6f"/>
<rect x="14" y="6" width="10" height="12" fill="#ffffff" stroke="#5b2c6f" stroke-width="2"/>
<text x="38" y="28" font-family="sans-serif" font-size="20" font-weight="700" \
fill="#5b2c6f">PREP</text>
</svg>
"""
"""The site's logo (identical in every cut)."""
