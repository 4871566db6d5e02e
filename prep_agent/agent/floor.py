"""The rollback floor (prep-cut-v1 §4.3): the highest sequence ever accepted.

``state.json`` keeps the floor; the journal is its second witness. The floor the
agent enforces is the highest of the state, the release ``current`` points to,
and the journal's word: the highest sequence published since the newest
``operator-reset-sequence``, or that reset's sequence (the operator's word is
the newest one). Once releases exist, a missing or unreadable state file stops
the agent (``require_state``): the floor is then only known from the journal and
the retained releases, so the operator re-creates it with ``prep-agent
reset-sequence``, whose sequence the error names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prep_agent.agent.state import State, load_state
from prep_agent.agent.store import Release, Store
from prep_agent.core.errors import Error

_EVENTS = (b'"cut-published"', b'"operator-rollback"', b'"operator-reset-sequence"')
"""The journal events that move the floor or say which releases were published."""


@dataclass(frozen=True)
class JournalWord:
    """What the journal says about the floor."""

    sequence: int = 0
    """Highest sequence published since the newest reset, or that reset's sequence."""
    manifest_sha256: str | None = None
    """The manifest SHA-256 that goes with ``sequence`` (None if the journal has none)."""
    set_aside: frozenset[str] = frozenset()
    """Releases published before the newest reset and not made current since: the
    operator lowered the floor below them (a leaked key), so they do not raise it."""


class JournalFloor:
    """Reads the journal's word on the floor, each time only the lines appended since.

    The journal is append-only; if it was replaced or cut short it is read again
    from its start. Lines that do not parse (a torn last line) are skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._restart(None)

    def _restart(self, file: tuple[int, int] | None) -> None:
        """Forget what was read; ``file`` is the (device, inode) read from now on."""
        self._file = file
        self._offset = 0
        self._sequence = 0
        self._sha256: str | None = None
        self._current_since_reset: set[str] = set()
        self._ever_current: set[str] = set()

    def read(self) -> JournalWord:
        """Take in the journal's new lines and return its word.

        Raises ``OSError`` if the journal exists but cannot be read.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            self._restart(None)
            return self.word()
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._file or st.st_size < self._offset:
                self._restart((st.st_dev, st.st_ino))
            fh.seek(self._offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # being written: read it next time
                self._offset += len(line)
                if any(event in line for event in _EVENTS):
                    self._take(line)
        return self.word()

    def word(self) -> JournalWord:
        """The journal's word as of the last ``read``."""
        set_aside = self._ever_current - self._current_since_reset
        return JournalWord(self._sequence, self._sha256, frozenset(set_aside))

    def _take(self, line: bytes) -> None:
        try:
            record: Any = json.loads(line)
            event = record["event"]
            if event == "cut-published":
                self._published(int(record["sequence"]), record.get("manifest_sha256"))
                self._made_current(str(record["release"]))
            elif event == "operator-rollback":
                self._made_current(str(record["release_to"]))
            elif event == "operator-reset-sequence":
                self._sequence = int(record["sequence_to"])
                self._sha256 = record.get("manifest_sha256")
                self._current_since_reset.clear()
        except (ValueError, TypeError, KeyError):
            return

    def _published(self, sequence: int, sha256: str | None) -> None:
        if sequence >= self._sequence:
            self._sequence, self._sha256 = sequence, sha256

    def _made_current(self, release: str) -> None:
        self._ever_current.add(release)
        self._current_since_reset.add(release)


def release_sequence(name: str) -> int:
    """The sequence a release folder's name starts with (``store.release_name``).

    Raises ``Error`` if ``name`` is not a release folder's name.
    """
    head = name.partition("-")[0]
    if not head.isdigit():
        raise Error(f"{name!r} is not a release folder (<sequence>-<manifest digest>)")
    return int(head)


def recovery_sequence(releases: list[str], word: JournalWord, current: int | None) -> int:
    """The floor to re-create a lost state with: the highest of the journal's word,
    ``current`` and every retained release the journal does not set aside."""
    kept = [release_sequence(n) for n in releases if n not in word.set_aside]
    return max([word.sequence, current or 0, *kept])


def require_state(path: Path, releases: list[str], word: JournalWord, current: int | None) -> State:
    """The state file, which must exist and be readable once releases exist.

    Without releases a missing file is the empty state. Raises ``Error`` with
    the recovery command (``prep-agent reset-sequence --to N``, N from
    ``recovery_sequence``) when releases exist and the file is missing or
    unreadable.
    """
    try:
        return load_state(path, missing_ok=not releases)
    except Error as exc:
        if not releases:
            raise
        n = recovery_sequence(releases, word, current)
        raise Error(
            f"{exc}; releases exist, so the rollback floor is unknown: check the journal, "
            f"move a damaged file aside, then run `prep-agent reset-sequence --to {n}` "
            "(the highest sequence the journal and the retained releases show)"
        ) from None


def raised_state(state: State, current: Release | None, word: JournalWord) -> State:
    """``state`` with its floor raised to ``current`` or to the journal's word when
    either is higher (a crash between the swap and the state write, §5; a state file
    older than the journal). On a tie the state's own digest is kept."""
    candidates = [(word.sequence, word.manifest_sha256)]
    if current is not None:
        candidates.insert(0, (current.manifest.sequence, current.manifest_sha256))
    sequence, sha256 = state.highest_sequence, state.highest_manifest_sha256
    for candidate in candidates:
        if candidate[0] > sequence:
            sequence, sha256 = candidate
    if sequence == state.highest_sequence:
        return state
    return replace(state, highest_sequence=sequence, highest_manifest_sha256=sha256)


def checked_state(state_file: Path, store: Store, journal: JournalFloor) -> tuple[State, bool]:
    """The state as ``require_state`` reads it, raised by ``raised_state``, and
    whether it was raised (then the file is behind it).

    Raises ``Error`` (missing or unreadable state while releases exist), ``OSError``.
    """
    word = journal.read()
    current = store.current()
    sequence = current.manifest.sequence if current else None
    state = require_state(state_file, store.release_names(), word, sequence)
    raised = raised_state(state, current, word)
    return raised, raised is not state
