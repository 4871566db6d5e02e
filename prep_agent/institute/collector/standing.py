"""The difusores in good standing, for the institute's own site (the seed's
"inhabilitar la liga"): every registered difusor not flagged for ``unlink_periods``
periods and whose public copy was not found altered by its latest audit, as JSON
and as an HTML fragment to include. A flagged difusor drops out by itself and
returns once it is current again (its flag clears)."""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

from prep_agent.institute.audit.check import ALTERED
from prep_agent.institute.collector.board import Board
from prep_agent.institute.collector.config import DifusorEntry


def public_url(entry: DifusorEntry | None) -> str | None:
    """The difusor's public site: the origin of its status_url (or health_url)."""
    url = (entry.status_url or entry.health_url) if entry else None
    found = re.match(r"https?://[^/\s]+", url or "")
    return found.group(0) + "/" if found else None


def good_standing(board: Board, entries: Mapping[str, DifusorEntry]) -> list[dict[str, Any]]:
    """Difusores not flagged, in name order: id, name and public URL."""
    rows = [
        r
        for r in board.rows
        if not r.unlink
        and r.copy != ALTERED  # an altered public copy is not linked, not even once
        and (r.service_id not in entries or entries[r.service_id].enabled)
    ]
    return [
        {"serviceId": r.service_id, "name": r.name, "url": public_url(entries.get(r.service_id))}
        for r in sorted(rows, key=lambda r: (r.name.casefold(), r.service_id))
    ]


def standing_json(board: Board, entries: Mapping[str, DifusorEntry]) -> dict[str, Any]:
    """The JSON document of the list."""
    return {
        "time": board.now.isoformat(timespec="seconds"),
        "difusores": good_standing(board, entries),
    }


def standing_html(board: Board, entries: Mapping[str, DifusorEntry]) -> str:
    """The HTML fragment: a list of links (Spanish, escaped)."""
    items = []
    for item in good_standing(board, entries):
        name = html.escape(item["name"])
        if item["url"]:
            url = html.escape(item["url"], quote=True)
            name = f'<a href="{url}" rel="noopener" target="_blank">{name}</a>'
        items.append(f'  <li data-difusor="{html.escape(item["serviceId"])}">{name}</li>\n')
    return (
        '<ul class="prep-difusores" aria-label="Difusores oficiales del PREP">\n'
        + "".join(items)
        + "</ul>\n"
    )
