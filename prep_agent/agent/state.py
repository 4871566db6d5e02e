"""The durable agent state: highest accepted sequence, last package, last rejection.

What is *published* is never stored here: it is derived from the release
``current`` points to (prep-cut-v1 §5). This file only keeps what a release
cannot tell: the rollback floor and the latest rejection.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prep_agent.core.errors import Error
from prep_agent.shared.fsutil import atomic_write


@dataclass(frozen=True)
class Rejected:
    """The latest rejected cut."""

    time: str
    reason: str
    detail: str
    sequence: int | None = None


@dataclass(frozen=True)
class State:
    """Contents of ``state.json``."""

    highest_sequence: int = 0
    highest_manifest_sha256: str | None = None
    last_rejection: Rejected | None = None
    last_decided_signature: str | None = None
    package_stamp: str | None = None
    """https-package source: the stamp of the last package published (RFC 3339, its offset)."""
    package_sha256: str | None = None
    """The SHA-256 of that package's zip: with the stamp, what ``core.package.check_order``
    decides rollback, replay and equivocation against."""
    package_decided_sha256: str | None = None
    """The SHA-256 of the last package decided (published, replayed or rejected): the same
    bytes fetched again (after a restart) are not decided and journaled again."""


def load_state(path: Path, missing_ok: bool = True) -> State:
    """Read the state file; a missing file is the empty state if ``missing_ok``.

    Raises ``Error`` if the file exists but is unreadable or corrupt, or is
    missing and not ``missing_ok``.
    """
    try:
        raw: Any = json.loads(path.read_bytes())
    except FileNotFoundError:
        if not missing_ok:
            raise Error(f"state file {path} is missing") from None
        return State()
    except (OSError, ValueError) as exc:
        raise Error(f"state file {path} is unreadable: {exc}") from None
    try:
        rejection = raw.get("last_rejection")
        return State(
            highest_sequence=int(raw.get("highest_sequence", 0)),
            highest_manifest_sha256=raw.get("highest_manifest_sha256"),
            last_rejection=Rejected(**rejection) if rejection else None,
            last_decided_signature=raw.get("last_decided_signature"),
            package_stamp=raw.get("package_stamp"),
            package_sha256=raw.get("package_sha256"),
            package_decided_sha256=raw.get("package_decided_sha256"),
        )
    except (AttributeError, TypeError, ValueError) as exc:
        raise Error(f"state file {path} is corrupt: {exc}") from None


def save_state(path: Path, state: State) -> None:
    """Write the state file durably (fsync + rename + directory fsync)."""
    data = json.dumps(asdict(state), indent=2, sort_keys=True).encode() + b"\n"
    atomic_write(path, data)
