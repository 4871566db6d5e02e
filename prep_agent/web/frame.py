"""The embeddable frame (prep-cut-v1 §5–§6): ``public/index.html`` and ``status.json``.

The agent rewrites both after every change of ``current``. The institute's
publication is served under an immutable, cut-specific URL
(``cortes/<release>/<entry>``); only the frame and the small status document
change, so a browser or a CDN never mixes two cuts. The page itself
(``static/frame.js``) follows ``status.json`` and decides the interruption
notice from the server's clock and the signed cut time.
"""

from __future__ import annotations

import html
import json
import shutil
from datetime import datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import quote

from prep_agent.agent.config import Config
from prep_agent.agent.package_store import read_package_info, source_text
from prep_agent.agent.store import Release
from prep_agent.core.cuttime import format_cut_time
from prep_agent.core.freshness import FINAL, NO_CUT, freshness, stale_at
from prep_agent.core.protocol import RELEASES_FOLDER
from prep_agent.shared.fsutil import atomic_write

RELEASES_URL = RELEASES_FOLDER
"""URL folder under which each release is served, immutable."""
STALE_TEXT = (
    "AVISO: se interrumpió la transmisión de los Resultados Electorales Preliminares. "
    "La información mostrada corresponde al último corte recibido."
)
"""Interruption notice shown when no cut arrived for ``stale_periods`` periods."""
FINAL_TEXT = "Corte final: cierre del Programa de Resultados Electorales Preliminares."
"""Shown with the institute's final cut."""
STATIC_FILES = ("frame.css", "frame.js")


def release_url(release: Release, path: str) -> str:
    """Relative, immutable URL of a file of a release."""
    return f"{RELEASES_URL}/{quote(release.name)}/{quote(path)}"


def public_status(config: Config, release: Release | None, now: datetime) -> dict[str, Any]:
    """The public ``status.json``: what the page needs to show and follow the cut."""
    if release is None:
        return {
            "format": "prep-status/1",
            "sequence": None,
            "cut_time": None,
            "release": None,
            "entry": None,
            "period_seconds": None,
            "stale_periods": config.stale_periods,
            "stale_at": None,
            "final": False,
            "notice": None,
            "state": NO_CUT,
            "written_at": now.isoformat(timespec="seconds"),
            "source": None,
        }
    m = release.manifest
    return {
        "format": "prep-status/1",
        "sequence": m.sequence,
        "cut_time": m.cut_time_text,
        "release": release.name,
        "entry": release_url(release, m.entry),
        "period_seconds": m.period_seconds,
        "stale_periods": config.stale_periods,
        "stale_at": stale_at(m, config.stale_periods).isoformat(),
        "final": m.final,
        "notice": {"level": m.notice.level, "text": m.notice.text} if m.notice else None,
        "state": freshness(m, now, config.stale_periods),
        "written_at": now.isoformat(timespec="seconds"),
        "source": release_source(release),
    }


def release_source(release: Release) -> dict[str, Any]:
    """Where a release's cut came from: the drop folder (signed prep-cut/1), or the
    institute's host and whether its package was signed, with the frame's Spanish line.

    Raises ``Error`` if the release's package.json is damaged.
    """
    info = read_package_info(release)
    if info is None:
        return {"type": "drop-folder", "host": None, "signed": True, "text": None}
    return {
        "type": "https-package",
        "host": info.host,
        "signed": info.signed,
        "package": info.name,
        "package_sha256": info.sha256,
        "text": source_text(info),
    }


def _logo_name(config: Config) -> str | None:
    return f"logo{config.logo.suffix.lower()}" if config.logo else None


def render_frame(config: Config, status: dict[str, Any], release: Release | None) -> str:
    """The frame page with the current cut already in it (works before any script runs)."""
    e = html.escape
    state = status["state"]
    cut_label = ""
    if release is not None:
        cut_label = format_cut_time(release.manifest.cut_time_text, release.manifest.cut_time)
    logo = _logo_name(config)
    logo_tag = f'<img src="static/{logo}" alt="">' if logo else ""
    notice = status["notice"] or {}
    notice_class = "interrupted" if notice.get("level") == "interrupted" else "info"
    frame_src = f' src="{e(status["entry"])}"' if status["entry"] else ""
    source_line = (status["source"] or {}).get("text") or ""
    data = json.dumps(status, ensure_ascii=False).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="es-MX">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Resultados Electorales Preliminares · {e(config.difusor_name)}</title>
<link rel="stylesheet" href="static/frame.css">
<script src="static/frame.js" defer></script>
</head>
<body data-state="{e(state)}" data-poll="{config.poll_seconds}" data-sequence="{status["sequence"] or ""}">
<header class="bar">
<div class="difusor">{logo_tag}<span>{e(config.difusor_name)}</span></div>
<p class="cut" id="cut"{"" if release else " hidden"}>Corte de información: <time id="cut-time" datetime="{e(status["cut_time"] or "")}">{e(cut_label)}</time></p>
<p class="source" id="source"{"" if source_line else " hidden"}>{e(source_line)}</p>
</header>
<div class="notices" role="status" aria-live="polite">
<p class="notice opening" id="opening"{" hidden" if release else ""}>{e(config.opening_text)}</p>
<p class="notice interrupted" id="stale-notice" role="alert"{"" if state == "stale" else " hidden"}>{e(STALE_TEXT)}</p>
<p class="notice final" id="final-notice"{"" if state == FINAL else " hidden"}>{e(FINAL_TEXT)}</p>
<p class="notice {notice_class}" id="institute-notice"{"" if notice else " hidden"}>{e(notice.get("text", ""))}</p>
</div>
<main><iframe id="publication" title="Resultados Electorales Preliminares"{frame_src}></iframe></main>
<script type="application/json" id="initial-status">{data}</script>
</body>
</html>
"""  # noqa: E501


def install_static(config: Config) -> None:
    """Copy the page's assets (and the difusor's logo) into ``public/static``."""
    static = config.public / "static"
    static.mkdir(parents=True, exist_ok=True)
    package = resources.files("prep_agent.web") / "static"
    for name in STATIC_FILES:
        atomic_write(static / name, (package / name).read_bytes())
    logo = _logo_name(config)
    if config.logo is not None and logo is not None:
        tmp = static / f".{logo}.tmp"
        shutil.copyfile(config.logo, tmp)
        tmp.replace(static / logo)


def write_public(config: Config, release: Release | None, now: datetime) -> None:
    """Rewrite ``index.html`` then ``status.json`` (each atomically) for ``release``
    as of ``now`` (the caller's clock: it decides ``current`` or ``stale``).

    ``status.json`` is the pointer pages and tools follow, so it goes last: once
    it names a cut, the frame on disk shows that cut too.

    Raises ``OSError``.
    """
    config.public.mkdir(parents=True, exist_ok=True)
    status = public_status(config, release, now)
    body = json.dumps(status, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"
    atomic_write(config.public / "index.html", render_frame(config, status, release).encode())
    atomic_write(config.public / "status.json", body)


def stale_deadline(release: Release | None, stale_periods: int) -> datetime | None:
    """When the public files should be rewritten to say ``stale`` (for no-JS readers)."""
    if release is None or release.manifest.final:
        return None
    return stale_at(release.manifest, stale_periods) + timedelta(seconds=1)
