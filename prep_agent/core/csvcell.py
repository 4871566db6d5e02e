"""CSV cells a spreadsheet will not run as formulas (CSV injection).

Spreadsheets read a cell starting with ``=``, ``+``, ``-`` or ``@`` as a
formula, and some skip a leading tab or carriage return first; text that a
difusor or a web client controls (``=HYPERLINK(...)`` as a health status, a
request line in an access log) would then run on the desk of whoever opens the
export. Such text gets a leading single quote, as OWASP recommends. Only text
is touched: numbers we computed are written as numbers, negative ones included.
"""

from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a text cell as a formula."""


def csv_safe(cell: object) -> object:
    """``cell`` fit to be written to a CSV: a ``str`` starting with one of
    :data:`FORMULA_STARTS` gets a leading ``'``; anything else (numbers, booleans,
    other text) is returned unchanged. Raises nothing."""
    if isinstance(cell, str) and cell.startswith(FORMULA_STARTS):
        return "'" + cell
    return cell
