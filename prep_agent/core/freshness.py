"""Freshness of the published cut (prep-cut-v1 §6), from the signed cut_time only."""

from __future__ import annotations

from datetime import datetime, timedelta

from prep_agent.core.manifest import Manifest

NO_CUT = "no-cut"
"""Nothing published yet."""
CURRENT = "current"
"""Published and within ``stale_periods`` periods of its cut_time."""
STALE = "stale"
"""No new cut for ``stale_periods`` periods: the interruption notice shows."""
FINAL = "final"
"""The institute's last cut: never stale."""


def stale_at(manifest: Manifest, stale_periods: int) -> datetime:
    """The instant after which a non-final cut is stale."""
    return manifest.cut_time + timedelta(seconds=stale_periods * manifest.period_seconds)


def freshness(manifest: Manifest | None, now: datetime, stale_periods: int) -> str:
    """One of NO_CUT, CURRENT, STALE, FINAL for the published manifest at ``now``."""
    if manifest is None:
        return NO_CUT
    if manifest.final:
        return FINAL
    return STALE if now > stale_at(manifest, stale_periods) else CURRENT
