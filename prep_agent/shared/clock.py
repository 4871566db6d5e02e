"""The wall clock, as one dependency the agent injects into everything below it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Callable

Clock = Callable[[], datetime]
"""A source of aware UTC instants: ``utc_now`` in service, a fake one in tests."""


def utc_now() -> datetime:
    """The real clock (UTC, aware)."""
    return datetime.now(timezone.utc)
