"""Reading a PREP results CSV as the institutes publish it, without trusting its shape.

Line 1 names the election, line 2 carries the cut stamp, then come the summary
header and its values, and later the per-acta table, found by its first column
name (``CLAVE_CASILLA``), never by counting lines: some states add blank lines.
Real files vary: commas or pipes, UTF-8 with or without BOM or Latin-1, LF or
CRLF, quoted or bare cells, vote cells holding ``Sin dato``, ``Ilegible``, ``-``
or nothing, and counts that disagree. Every oddity is a warning; reading never
raises on content. Cells are kept exactly as written (quotes removed by the CSV
rules only), so what is shown from them is what the institute published.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

TABLE_FIRST_COLUMN = "CLAVE_CASILLA"
"""First column name of the per-acta table."""
SUMMARY_FIRST_COLUMN = "ACTAS_ESPERADAS"
"""First column name of the summary header."""
MAX_WARNINGS = 20
"""Warnings kept per file; further ones are counted in one closing warning."""

_BOM = b"\xef\xbb\xbf"
_SEPARATORS = (",", "|")


@dataclass(frozen=True)
class PrepCsv:
    """One results CSV read: its title, stamp text, summary and per-acta table."""

    election: str
    """Line 1, the election's name as written (``GUBERNATURA``)."""
    stamp_text: str
    """Line 2 as written, quotes removed (``07/06/2021 20:00 (UTC-5)``)."""
    summary: tuple[tuple[str, str], ...]
    """Summary header names paired with their values, in file order."""
    columns: tuple[str, ...]
    """Per-acta table header; empty if the file has no such table."""
    rows: tuple[tuple[str, ...], ...]
    """Per-acta rows, each padded or cut to ``len(columns)`` (a warning says so)."""
    encoding: str
    """``utf-8`` or ``latin-1``: how the bytes were decoded."""
    separator: str
    """``,`` or ``|``."""
    warnings: tuple[str, ...] = field(default=())
    """One-line notes on oddities found (English, for the operator)."""

    def summary_value(self, name: str) -> str | None:
        """The summary cell under header ``name`` (ignoring case and accents), or None."""
        wanted = fold_header(name)
        for header, value in self.summary:
            if fold_header(header) == wanted:
                return value
        return None


def decode(data: bytes) -> tuple[str, str]:
    """``data`` as text and the encoding used: UTF-8 (BOM dropped) if valid, else Latin-1.

    Raises nothing: every byte string is valid Latin-1.
    """
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("latin-1"), "latin-1"


def read_prep_csv(data: bytes) -> PrepCsv:
    """Read a PREP results CSV from its bytes; oddities become warnings, never errors.

    Raises nothing on any content (a file without summary or table gives empty ones).
    """
    text, encoding = decode(data)
    lines = text.splitlines()
    separator = _separator(lines)
    warnings = _Warnings()
    election = _single_cell(lines[0] if lines else "", separator)
    stamp_text = _single_cell(lines[1] if len(lines) > 1 else "", separator)
    summary: tuple[tuple[str, str], ...] = ()
    columns: tuple[str, ...] = ()
    rows: list[tuple[str, ...]] = []
    index = 2
    while index < len(lines):
        cells = _cells(lines[index], separator)
        first = fold_header(cells[0]) if cells else ""
        if first == SUMMARY_FIRST_COLUMN and not summary:
            index, summary = _read_summary(lines, index, separator, warnings)
            continue
        if first == TABLE_FIRST_COLUMN:
            columns = tuple(cell.strip() for cell in cells)
            rows = _read_table(lines[index + 1 :], index + 2, columns, separator, warnings)
            break
        if cells and any(cell.strip() for cell in cells):
            warnings.add(f"line {index + 1}: unexpected line before the acta table, skipped")
        index += 1
    if not summary:
        warnings.add(f"no summary header starting with {SUMMARY_FIRST_COLUMN}")
    if not columns:
        warnings.add(f"no acta table starting with {TABLE_FIRST_COLUMN}")
    result = PrepCsv(election, stamp_text, summary, columns, tuple(rows), encoding, separator)
    for note in check_counts(result):
        warnings.add(note)
    return PrepCsv(
        election,
        stamp_text,
        summary,
        columns,
        tuple(rows),
        encoding,
        separator,
        warnings.closed(),
    )


def check_counts(table: PrepCsv) -> list[str]:
    """Notes on summary counts that disagree with each other (real files have such errors).

    Registered actas are captured plus out-of-catalogue ones; captured ones are
    counted plus not counted; none exceeds the expected. Missing or non-numeric
    cells are skipped. Raises nothing.
    """
    value = {name: _integer(table.summary_value(name)) for name in _COUNTS}
    notes: list[str] = []
    registered, outside = value["ACTAS_REGISTRADAS"], value["ACTAS_FUERA_CATALOGO"]
    captured, expected = value["ACTAS_CAPTURADAS"], value["ACTAS_ESPERADAS"]
    counted, uncounted = value["ACTAS_CONTABILIZADAS"], value["ACTAS_NO_CONTABILIZADAS"]
    if None not in (registered, outside, captured) and registered != _sum(captured, outside):
        notes.append(
            f"summary: {registered} actas registered but {captured} captured "
            f"+ {outside} out of catalogue"
        )
    if None not in (captured, counted, uncounted) and captured != _sum(counted, uncounted):
        notes.append(
            f"summary: {captured} actas captured but {counted} counted + {uncounted} not counted"
        )
    if captured is not None and expected is not None and captured > expected:
        notes.append(f"summary: {captured} actas captured, over the {expected} expected")
    return notes


_COUNTS = (
    "ACTAS_ESPERADAS",
    "ACTAS_REGISTRADAS",
    "ACTAS_FUERA_CATALOGO",
    "ACTAS_CAPTURADAS",
    "ACTAS_CONTABILIZADAS",
    "ACTAS_NO_CONTABILIZADAS",
)
"""Summary counts compared by :func:`check_counts`."""


def _sum(first: int | None, second: int | None) -> int:
    """``first + second``; callers have checked neither is None."""
    return (first or 0) + (second or 0)


def _integer(cell: str | None) -> int | None:
    """A cell holding only ASCII digits as an int; anything else None."""
    if cell is None:
        return None
    text = cell.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def fold_header(name: str) -> str:
    """A header name compared loosely: case, accents, spaces and ``_DE_`` ignored; raises nothing.

    ``ACTAS_FUERA_CATÁLOGO`` (Sonora) and ``ACTAS_FUERA_DE_CATALOGO`` (INE) both
    fold to ``ACTAS_FUERA_CATALOGO``.
    """
    plain = name.strip().strip("\ufeff").upper()
    for accented, bare in (("Á", "A"), ("É", "E"), ("Í", "I"), ("Ó", "O"), ("Ú", "U")):
        plain = plain.replace(accented, bare)
    return plain.replace(" ", "_").replace("_DE_", "_")


def _separator(lines: list[str]) -> str:
    """The separator of the header lines: ``|`` if they hold more pipes than commas."""
    sample = "\n".join(lines[2:12])
    return max(_SEPARATORS, key=sample.count)


def _cells(line: str, separator: str) -> list[str]:
    """One line split by the CSV rules; a malformed line is split as best csv can."""
    try:
        return next(csv.reader([line], delimiter=separator, strict=False), [])
    except csv.Error:
        return line.split(separator)


def _single_cell(line: str, separator: str) -> str:
    """Lines 1 and 2: the whole line as one cell, surrounding quotes and blanks removed."""
    cells = [cell.strip() for cell in _cells(line, separator)]
    return separator.join(cell for cell in cells if cell)


def _read_summary(
    lines: list[str], index: int, separator: str, warnings: _Warnings
) -> tuple[int, tuple[tuple[str, str], ...]]:
    """The summary at ``lines[index]`` (header) and the next non-blank line (values).

    Returns the index after the values and the pairs.
    """
    header = [cell.strip() for cell in _cells(lines[index], separator)]
    if header and header[-1] == "":
        header.pop()
    at = index + 1
    while at < len(lines) and not lines[at].strip():
        at += 1
    values = [cell.strip() for cell in _cells(lines[at], separator)] if at < len(lines) else []
    if len(values) == len(header) + 1 and values[-1] == "":
        values.pop()
    if len(values) != len(header):
        warnings.add(f"line {at + 1}: {len(values)} summary values for {len(header)} headers")
    padded = values + [""] * (len(header) - len(values))
    return at + 1, tuple(zip(header, padded))


def _read_table(
    lines: list[str],
    first_number: int,
    columns: tuple[str, ...],
    separator: str,
    warnings: _Warnings,
) -> list[tuple[str, ...]]:
    """Per-acta rows from ``lines``; ``first_number`` is the 1-based number of ``lines[0]``."""
    rows: list[tuple[str, ...]] = []
    width = len(columns)
    blanks = 0
    reader = csv.reader(lines, delimiter=separator, strict=False)
    try:
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                blanks += 1
                continue
            if len(cells) != width:
                number = first_number + reader.line_num - 1
                warnings.add(f"line {number}: {len(cells)} cells for {width} columns")
                cells = (cells + [""] * width)[:width]
            rows.append(tuple(cells))
    except csv.Error as exc:
        warnings.add(f"acta table unreadable after {len(rows)} rows ({exc})")
    if blanks:
        warnings.add(f"{blanks} blank lines in the acta table, skipped")
    return rows


class _Warnings:
    """Warnings of one file, at most :data:`MAX_WARNINGS` kept."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.dropped = 0

    def add(self, note: str) -> None:
        """Keep ``note``, or count it once :data:`MAX_WARNINGS` are kept."""
        if len(self.kept) < MAX_WARNINGS:
            self.kept.append(note)
        else:
            self.dropped += 1

    def closed(self) -> tuple[str, ...]:
        """The kept warnings, and a last one counting those dropped."""
        if self.dropped:
            return (*self.kept, f"{self.dropped} more warnings not shown")
        return tuple(self.kept)


def read_plain_csv(data: bytes) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """A CSV without title or stamp (a candidates list): its header and rows, cells as written.

    Blank lines are skipped; rows are padded or cut to the header's width.
    Raises nothing on any content.
    """
    text, _ = decode(data)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return (), ()
    separator = max(_SEPARATORS, key=lines[0].count)
    header = tuple(cell.strip() for cell in _cells(lines[0], separator))
    width = len(header)
    rows: list[tuple[str, ...]] = []
    try:
        for cells in csv.reader(lines[1:], delimiter=separator, strict=False):
            rows.append(tuple((cells + [""] * width)[:width]))
    except csv.Error:
        pass
    return header, tuple(rows)
