"""The folders and files under the agent's root: the one place that names them.

::

    releases/<sequence>-<manifest sha256 prefix>/   immutable, read-only releases
    current -> releases/...                          the published cut (relative symlink)
    staging/                                         releases being built
    quarantine/<time>-<sequence>/                    rejected cuts: manifest, signature, reason
    public/                                          the frame, its assets, status.json
    nginx/                                           header snippets for nginx
    state.json                                       highest sequence, last rejection
    journal.jsonl                                    append-only journal of every event
    lock, publish.lock                               one agent per root; one publication
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """The paths of one agent root (absolute if ``root`` is)."""

    root: Path

    @property
    def releases(self) -> Path:
        """Folder of the immutable releases."""
        return self.root / "releases"

    @property
    def current(self) -> Path:
        """The symlink whose target is the published release."""
        return self.root / "current"

    @property
    def staging(self) -> Path:
        """Agent-owned folder where a release is built before it is renamed."""
        return self.root / "staging"

    @property
    def quarantine(self) -> Path:
        """Folder of rejected cuts (manifest, signature, reason)."""
        return self.root / "quarantine"

    @property
    def public(self) -> Path:
        """Folder of the frame, its assets and ``status.json`` (served as is)."""
        return self.root / "public"

    @property
    def nginx(self) -> Path:
        """Folder of the generated nginx header snippets."""
        return self.root / "nginx"

    @property
    def state_file(self) -> Path:
        """The durable state (highest sequence, last rejection)."""
        return self.root / "state.json"

    @property
    def journal_file(self) -> Path:
        """Append-only JSON-lines journal of every event."""
        return self.root / "journal.jsonl"

    @property
    def lock_file(self) -> Path:
        """Lock held by the one agent of this root."""
        return self.root / "lock"

    @property
    def publish_lock_file(self) -> Path:
        """Lock held while ``current`` may change: a publication step, or an
        operator's rollback or reset-sequence."""
        return self.root / "publish.lock"

    def current_target(self, name: str) -> str:
        """What ``current`` points to for release ``name``: a path relative to the
        root, so the root can be moved or mounted elsewhere."""
        return f"{self.releases.name}/{name}"

    def current_temp(self, pid: int) -> Path:
        """The symlink process ``pid`` builds before it replaces ``current`` with it."""
        return self.root / f".{self.current.name}.{pid}"

    def current_temps(self) -> list[Path]:
        """Temporary symlinks a swap interrupted by a crash left behind."""
        return sorted(self.root.glob(f".{self.current.name}.*"))

    def create(self) -> None:
        """Create the root and the folders the agent writes into (existing ones are kept)."""
        for folder in (self.root, self.releases, self.staging, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
