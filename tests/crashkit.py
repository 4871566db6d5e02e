"""Helpers of the crash and concurrency tests: audit a root, run the real daemon.

Everything here checks the published tree from the outside, as a reader or an
auditor would: through the file system and ``ssh-keygen -Y verify``; never
through the agent's own verification code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kit import AgentDaemon, Institute, ssh_sign, ssh_verify

WELL_KNOWN = ".well-known/prep-cut"
MANIFEST = f"{WELL_KNOWN}/manifest.json"
SIGNATURE = f"{WELL_KNOWN}/manifest.json.sig"


@dataclass(frozen=True)
class Seen:
    """A release found complete: its sequence, manifest SHA-256 and listed files."""

    name: str
    sequence: int
    manifest_sha256: str
    files: dict[str, tuple[int, str]]
    dirs: dict[str, int]
    """mtime (ns) of every folder: removing or adding an entry changes it."""


def walk_files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every non-directory entry under ``folder``."""
    found: dict[str, int] = {}
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = path.relative_to(folder).as_posix()
            found[rel] = st.st_size if stat.S_ISREG(st.st_mode) else -1
    return found


def _dir_times(folder: Path) -> dict[str, int]:
    out = {}
    for dirpath, _dirs, _names in os.walk(folder):
        out[dirpath] = os.stat(dirpath).st_mtime_ns
    return out


class Auditor:
    """Checks releases of one root; a release is hashed once, then re-checked cheaply.

    Releases are immutable, so after a full verification only the mtimes of
    their folders are compared (any entry removed or added changes one); if one
    changed, the file set and sizes are checked again.
    """

    def __init__(self, root: Path, allowed_signers: Path) -> None:
        self.root = root
        self.releases = root / "releases"
        self.allowed_signers = allowed_signers
        self.verified: dict[str, Seen] = {}

    def problems(self, name: str) -> list[str]:
        """What is wrong with ``releases/name`` (empty if it is complete)."""
        folder = self.releases / name
        seen = self.verified.get(name)
        if seen is not None and _dir_times(folder) == seen.dirs:
            return []  # unchanged since it was verified in full
        try:
            found = walk_files(folder)
        except OSError as exc:
            return [f"cannot walk: {exc}"]
        if seen is None:
            try:
                data = (folder / MANIFEST).read_bytes()
                doc = json.loads(data)
            except (OSError, ValueError) as exc:
                return [f"no readable manifest ({exc}); files present: {len(found)}"]
            listed = {e["path"]: (e["size"], e["sha256"]) for e in doc["files"]}
        else:
            listed = seen.files
        expected = {p: size for p, (size, _sha) in listed.items()}
        expected[MANIFEST] = found.get(MANIFEST, 0)
        expected[SIGNATURE] = found.get(SIGNATURE, 0)
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        resized = sorted(p for p in expected if p in found and found[p] != expected[p])
        out = []
        if missing:
            out.append(f"{len(missing)} missing files, e.g. {missing[:3]}")
        if extra:
            out.append(f"{len(extra)} unlisted files, e.g. {extra[:3]}")
        if resized:
            out.append(f"{len(resized)} files of another size, e.g. {resized[:3]}")
        if out or seen is not None:
            return out
        return self._verify_fully(name, folder, data, doc, listed)

    def _verify_fully(
        self,
        name: str,
        folder: Path,
        data: bytes,
        doc: dict[str, Any],
        listed: dict[str, tuple[int, str]],
    ) -> list[str]:
        out = []
        dirs = _dir_times(folder)
        for rel, (size, sha) in listed.items():
            path = folder / rel
            body = path.read_bytes()
            if len(body) != size or hashlib.sha256(body).hexdigest() != sha:
                out.append(f"{rel}: bytes differ from the manifest")
            if path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                out.append(f"{rel}: writable")
        digest = hashlib.sha256(data).hexdigest()
        if name != f"{doc['sequence']:016d}-{digest[:16]}":
            out.append(f"name does not match sequence {doc['sequence']} / {digest[:16]}")
        if not out:
            ssh_verify(self.allowed_signers, folder / SIGNATURE, data)
            self.verified[name] = Seen(name, doc["sequence"], digest, listed, dirs)
        return out

    def audit(self) -> dict[str, list[str]]:
        """Problems of every release in ``releases/`` (dot names are not releases)."""
        names = sorted(n for n in os.listdir(self.releases) if not n.startswith("."))
        for gone in set(self.verified) - set(names):
            del self.verified[gone]
        return {n: p for n in names for p in [self.problems(n)] if p}

    def current(self) -> Seen:
        """The release ``current`` points to; asserts it is a complete verified release."""
        link = self.root / "current"
        assert link.is_symlink(), "current is not a symlink"
        target = os.readlink(link)
        assert target.startswith("releases/") and "/" not in target[len("releases/") :], target
        name = target[len("releases/") :]
        problems = self.problems(name)
        assert not problems, f"current -> {target} is incomplete: {problems}"
        return self.verified[name]


def spawn_agent(config_path: Path, logs: Path, once: bool = False) -> AgentDaemon:
    """Start ``prep-agent run`` without waiting for it (a crash may come at any moment);
    each run logs to a file of its own in ``logs``."""
    log = logs / f"agent-{time.monotonic_ns()}.err"
    return AgentDaemon(config_path, log, once=once).spawn()


def state_json(root: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((root / "state.json").read_text())
    return doc


def deliver_unsigned(
    inst: Institute, inbox: Path, files: dict[str, bytes], doc: dict[str, Any]
) -> tuple[bytes, bytes]:
    """Upload the files and the manifest; return (manifest, signature) still to deliver."""
    for rel, body in files.items():
        target = inbox / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(body)
    data = json.dumps(doc, indent=1).encode()
    (inbox / "prep-manifest.json").write_bytes(data)
    return data, ssh_sign(inst.key, data)


def deliver_signature(inbox: Path, sig: bytes) -> None:
    """The last step of an upload: the signature appears atomically."""
    tmp = inbox / ".sig.part"
    tmp.write_bytes(sig)
    os.replace(tmp, inbox / "prep-manifest.json.sig")


def remove_root(root: Path) -> None:
    """Delete an agent root whose releases are read-only (saves disk between runs)."""
    if not root.exists():
        return
    for dirpath, _dirs, _files in os.walk(root):
        os.chmod(dirpath, 0o755)
    shutil.rmtree(root, ignore_errors=True)
