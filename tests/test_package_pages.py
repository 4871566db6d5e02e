"""Tests of prep_agent.agent.package_pages: results pages rendered from the real CSVs.

Each page is parsed back with the standard HTML parser; every number must be the
CSV cell exactly, every link must reach an original file of the package.
"""

from __future__ import annotations

import io
import posixpath
import zipfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest

from prep_agent.agent.package_pages import (
    GENERATED_NOTICE,
    PAGES_FOLDER,
    render_results_pages,
)
from prep_agent.core.package import Package, inspect_package
from prep_agent.core.prepcsv import read_plain_csv, read_prep_csv

pytestmark = pytest.mark.core

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "prep-real"
CUTS = REAL / "campeche-2021-cuts"
DELIVERY = REAL / "campeche-2021-20210601_1852_PREP_CAMP.zip"
SONORA = REAL / "sonora-2021"


@dataclass
class Table:
    """One parsed table: caption, header cells, body rows (cell texts)."""

    caption: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


class Page(HTMLParser):
    """The parts of a rendered page the tests look at."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.lang: str | None = None
        self.tables: list[Table] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._in_head = False
        self._in_caption = False
        self._row: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        values = dict(attrs)
        if tag == "html":
            self.lang = values.get("lang")
        elif tag == "a":
            self.links.append(values.get("href") or "")
        elif tag == "table":
            self.tables.append(Table())
        elif tag == "caption":
            self._in_caption = True
        elif tag == "thead":
            self._in_head = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "caption":
            self._in_caption = False
        elif tag == "thead":
            self._in_head = False
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            table = self.tables[-1]
            if self._in_head:
                table.header = self._row
            else:
                table.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        elif self._in_caption:
            self.tables[-1].caption += data


def pages_of(package: Package) -> dict[str, Page]:
    """The package's rendered pages, parsed."""
    return {
        path: Page(data.decode("utf-8")) for path, data in render_results_pages(package).items()
    }


def folder_package(cut: str) -> Package:
    """The real Campeche cut ``cut`` packed as one folder per election."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for folder in sorted(CUTS.glob(f"{cut}_PREP_*_CAMP")):
            for file in sorted(folder.iterdir()):
                archive.writestr(f"{folder.name}/{file.name}", file.read_bytes())
    return inspect_package(f"{cut}_PREP_CAMP.zip", buffer.getvalue())


def sonora_package() -> Package:
    """The real Sonora CSVs packed at the top of a package."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(SONORA.glob("*.csv")):
            archive.writestr(file.name, file.read_bytes())
    return inspect_package("20210607_1319_PREP_SON.zip", buffer.getvalue())


def target_of(link: str) -> str:
    """The path, relative to the release root, that a link of a page reaches."""
    return posixpath.normpath(posixpath.join(PAGES_FOLDER, unquote(link)))


def acta_rows(page: Page) -> list[list[str]]:
    """Every acta row of a page, in order, from all its per-group tables."""
    return [row for table in page.tables if table.caption.startswith("Actas") for row in table.rows]


def check_election_pages(package: Package) -> None:
    """Every election page shows its CSV's cells exactly and links to the originals."""
    pages = pages_of(package)
    assert set(pages) == {f"{PAGES_FOLDER}/index.html"} | {
        f"{PAGES_FOLDER}/{n:02d}-{e.code.lower().replace('_', '-')}.html"
        for n, e in enumerate(package.elections, start=1)
        if e.code is not None
    }
    for number, election in enumerate(package.elections, start=1):
        assert election.code is not None
        name = f"{PAGES_FOLDER}/{number:02d}-{election.code.lower().replace('_', '-')}.html"
        page = pages[name]
        table = read_prep_csv(package.entries[election.path])
        assert page.lang == "es-MX" and "script" not in page.tags
        assert GENERATED_NOTICE in "".join(page.text)
        summary = next(t for t in page.tables if t.caption == "Resumen del corte")
        assert [(row[1], row[2]) for row in summary.rows] == list(table.summary)
        rows = acta_rows(page)
        assert len(rows) == len(table.rows)
        header = next(t for t in page.tables if t.caption.startswith("Actas")).header
        assert all(t.header == header for t in page.tables if t.caption.startswith("Actas"))
        at = [[c.upper() for c in table.columns].index(name.upper()) for name in header]
        expected = sorted([row[i] for i in at] for row in table.rows)
        assert sorted(rows) == expected, election.path
        names = list(table.columns)
        votes = names[names.index("TOTAL_VOTOS_SACADOS") + 1 : names.index("TOTAL_VOTOS_ASENTADO")]
        after = ["TOTAL_VOTOS_CALCULADO", "LISTA_NOMINAL", "OBSERVACIONES", "CONTABILIZADA"]
        assert header == ["CLAVE_CASILLA", *votes, *after]
        assert votes[-2:] == ["NO_REGISTRADOS", "NULOS"] and len(votes) > 5
        if election.candidates is not None:
            candidates = next(t for t in page.tables if t.caption == "Candidaturas registradas")
            header, rows_c = read_plain_csv(package.entries[election.candidates])
            assert candidates.header == list(header)
            assert candidates.rows == [list(row) for row in rows_c]
        for link in page.links:
            if link == "index.html":
                continue
            assert target_of(link) in package.entries, link
        originals = {
            posixpath.normpath(posixpath.join(PAGES_FOLDER, unquote(a))) for a in page.links
        }
        assert election.path in originals


def test_the_real_delivery_zip_renders_every_cell_exactly() -> None:
    package = inspect_package("20210601_1852_PREP_CAMP.zip", DELIVERY.read_bytes())
    check_election_pages(package)


def test_the_last_real_campeche_cut_renders_every_cell_exactly() -> None:
    check_election_pages(folder_package("20210607_2000"))


def test_the_real_sonora_csvs_render_every_cell_exactly() -> None:
    package = sonora_package()
    check_election_pages(package)
    page = pages_of(package)[f"{PAGES_FOLDER}/02-dip-loc.html"]
    cells = {cell for row in acta_rows(page) for cell in row}
    assert "Sin dato" in cells
    summary = next(t for t in page.tables if t.caption == "Resumen del corte")
    assert ["Actas fuera de catálogo", "ACTAS_FUERA_CATÁLOGO", "31"] in summary.rows


def test_actas_are_grouped_by_district_or_municipality() -> None:
    package = folder_package("20210607_2000")
    pages = pages_of(package)
    ayun = pages[f"{PAGES_FOLDER}/01-ayun.html"]
    gub = pages[f"{PAGES_FOLDER}/03-gub.html"]
    assert "Actas, Municipio 001: CAMPECHE" in [t.caption for t in ayun.tables]
    assert "Actas, Distrito local 007: 007. TENABO" in [t.caption for t in gub.tables]
    table = read_prep_csv(package.entries[package.elections[0].path])
    municipios = {row[table.columns.index("ID_MUNICIPIO")] for row in table.rows}
    captions = [t.caption for t in ayun.tables if t.caption.startswith("Actas, Municipio")]
    assert len(captions) == len(municipios)


def test_the_index_lists_the_elections_and_every_original_file() -> None:
    package = inspect_package("20210601_1852_PREP_CAMP.zip", DELIVERY.read_bytes())
    index = pages_of(package)[f"{PAGES_FOLDER}/index.html"]
    assert index.lang == "es-MX" and GENERATED_NOTICE in "".join(index.text)
    assert "Corte del paquete: 01/06/2021 18:52 (UTC-05:00)" in "".join(index.text)
    targets = [target_of(link) for link in index.links]
    assert set(package.entries) <= set(targets)
    assert "resultados/01-ayun.html" in targets


def test_cells_and_names_are_escaped() -> None:
    original = (CUTS / "20210607_2000_PREP_GOB_CAMP" / "CAMP_GOB_2021.csv").read_bytes()
    hostile = original.replace(b"GUBERNATURA", b"<script>alert(1)</script>", 1)
    hostile = hostile.replace(b"TENABO", b'TENABO"><img src=x onerror=alert(1)>')
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("20210607_2000_PREP_GOB_CAMP/CAMP_GOB_2021.csv", hostile)
        archive.writestr("20210607_2000_PREP_GOB_CAMP/a&b <x>.txt", b"x")
    package = inspect_package("20210607_2000_PREP_CAMP.zip", buffer.getvalue())
    rendered = render_results_pages(package)
    for data in rendered.values():
        assert b"<script" not in data and b"<img" not in data
    page = Page(rendered[f"{PAGES_FOLDER}/01-gub.html"].decode("utf-8"))
    assert "Gubernatura (<script>alert(1)</script>)" in "".join(page.text)
    assert {"script", "img"}.isdisjoint(page.tags)
    index = Page(rendered[f"{PAGES_FOLDER}/index.html"].decode("utf-8"))
    assert "../20210607_2000_PREP_GOB_CAMP/a%26b%20%3Cx%3E.txt" in index.links


def test_links_follow_the_files_prefix() -> None:
    package = inspect_package("20210601_1852_PREP_CAMP.zip", DELIVERY.read_bytes())
    rendered = render_results_pages(package, files_prefix="paquete")
    index = Page(rendered[f"{PAGES_FOLDER}/index.html"].decode("utf-8"))
    assert "../paquete/20210601_1852_PREP_GOB_CAMP.zip" in index.links
