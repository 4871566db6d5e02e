"""Real SFTP uploads into the drop folder, and the agent as a real daemon process.

Uploads go through the OpenSSH ``sftp`` client in batch mode, connected with
``-D`` straight to a local ``sftp-server -d INBOX`` (no sshd, no keys): the
drop folder sees exactly the system calls a real SFTP upload makes (open with
O_TRUNC, pipelined writes, posix-rename, mkdir, resume with ``reput``).
The agent is ``prep-agent run`` in its own process with its inotify watcher;
it is observed only from outside: journal, ``status --json`` and ``current``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME, WELL_KNOWN
from tests.kit import (
    PREP_AGENT,
    AgentDaemon,
    Institute,
    ssh_sign,
    ssh_verify,
    tree_digest,
    wait_for,
)

SFTP_SERVER = Path("/usr/lib/openssh/sftp-server")
"""Debian package openssh-sftp-server."""


# --- cuts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """A signed cut as the institute holds it locally before uploading it."""

    sequence: int
    cut_time: datetime
    files: dict[str, bytes]
    """Every listed file (the publication tree), by path."""
    manifest: bytes
    signature: bytes
    local: Path
    """Local folder holding the files, the manifest and the signature."""

    def path(self, rel: str) -> Path:
        """The local copy of a listed file (or of the manifest / signature)."""
        return self.local / rel

    def expected_tree(self) -> dict[str, str]:
        """SHA-256 of every file the published release must hold, exactly."""
        tree = {rel: _sha(data) for rel, data in self.files.items()}
        tree[f"{WELL_KNOWN}/manifest.json"] = _sha(self.manifest)
        tree[f"{WELL_KNOWN}/manifest.json.sig"] = _sha(self.signature)
        return tree

    @property
    def manifest_sha256(self) -> str:
        return _sha(self.manifest)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_cut(
    institute: Institute,
    outbox: Path,
    sequence: int,
    cut_time: datetime,
    files: dict[str, bytes] | None = None,
) -> Cut:
    """Make, sign (``ssh-keygen -Y sign``) and stage a cut under ``outbox``."""
    files = institute.files(cut_time, sequence) if files is None else files
    doc = institute.manifest(files, sequence, cut_time)
    manifest = json.dumps(doc, indent=1).encode()
    signature = ssh_sign(institute.key, manifest)
    local = outbox / f"cut-{sequence}"
    for rel, data in {**files, MANIFEST_NAME: manifest, SIGNATURE_NAME: signature}.items():
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return Cut(sequence, cut_time, dict(files), manifest, signature, local)


def cut_times(base: datetime, count: int) -> list[datetime]:
    """``count`` increasing whole-minute cut times after ``base``."""
    return [base + timedelta(minutes=i + 1) for i in range(count)]


# --- sftp batches -----------------------------------------------------------------------


def _quote(text: str) -> str:
    assert not any(c in text for c in '"\\\n'), f"unquotable sftp path {text!r}"
    return f'"{text}"'


class Batch:
    """Builds an sftp batch file; ``-mkdir`` ignores folders that already exist."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._dirs: set[str] = set()

    def mkdirs(self, rel: str) -> None:
        """Create every missing parent folder of ``rel`` (``mkdir`` per level)."""
        parts = rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folder = "/".join(parts[:depth])
            if folder not in self._dirs:
                self._dirs.add(folder)
                self.lines.append(f"-mkdir {_quote(folder)}")

    def put(self, local: Path, rel: str, temp: bool = False) -> Batch:
        """Upload ``local`` as ``rel``: directly, or as ``.name.part`` then ``rename``."""
        self.mkdirs(rel)
        if not temp:
            self.lines.append(f"put {_quote(str(local))} {_quote(rel)}")
            return self
        head, _, name = rel.rpartition("/")
        part = f"{head}/.{name}.part" if head else f".{name}.part"
        self.lines.append(f"put {_quote(str(local))} {_quote(part)}")
        self.lines.append(f"rename {_quote(part)} {_quote(rel)}")
        return self

    def reput(self, local: Path, rel: str) -> Batch:
        """Resume an interrupted upload (append from the remote size)."""
        self.lines.append(f"reput {_quote(str(local))} {_quote(rel)}")
        return self

    def rm(self, rel: str) -> Batch:
        self.lines.append(f"rm {_quote(rel)}")
        return self

    def data(self, cut: Cut, paths: Iterable[str] | None = None, temp: bool = False) -> Batch:
        """Upload the listed files (all, or only ``paths``), in sorted order."""
        for rel in sorted(cut.files) if paths is None else paths:
            self.put(cut.path(rel), rel, temp)
        return self

    def manifest(self, cut: Cut, temp: bool = False) -> Batch:
        return self.put(cut.path(MANIFEST_NAME), MANIFEST_NAME, temp)

    def signature(self, cut: Cut, temp: bool = False) -> Batch:
        return self.put(cut.path(SIGNATURE_NAME), SIGNATURE_NAME, temp)

    def cut(self, cut: Cut, paths: Iterable[str] | None = None, temp: bool = False) -> Batch:
        """The normal order (spec §1.2): data, then the manifest, the signature last."""
        return self.data(cut, paths, temp).manifest(cut, temp).signature(cut, temp)


class Sftp:
    """Runs batches with the real ``sftp`` client against ``sftp-server -d INBOX``."""

    def __init__(self, inbox: Path, workdir: Path) -> None:
        assert SFTP_SERVER.is_file(), f"{SFTP_SERVER} missing: apt-get install openssh-sftp-server"
        assert not any(c.isspace() for c in str(inbox)), "sftp -D splits on whitespace"
        self.inbox = inbox
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def command(self, batch: Batch, limit_kbit: int | None = None) -> list[str]:
        self._count += 1
        path = self.workdir / f"batch-{self._count}.txt"
        path.write_text("\n".join(batch.lines) + "\n")
        limit = ["-l", str(limit_kbit)] if limit_kbit else []
        server = f"{SFTP_SERVER} -d {self.inbox}"
        return ["sftp", "-b", str(path), *limit, "-D", server]

    def run(self, batch: Batch, timeout: float = 60) -> None:
        """Run a batch to completion; every command must succeed."""
        proc = subprocess.run(
            self.command(batch),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, f"sftp failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"

    def start(self, batch: Batch, limit_kbit: int | None = None) -> subprocess.Popen[bytes]:
        """Start a batch in the background (e.g. to kill it mid-transfer)."""
        return subprocess.Popen(
            self.command(batch, limit_kbit),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (scans /proc/*/stat)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rpartition(")")[2].split()[0] in ("Z", "X")


def kill_mid_transfer(
    proc: subprocess.Popen[bytes], target: Path, at_least: int, total: int
) -> int:
    """SIGKILL the sftp client once ``target`` holds ``at_least`` bytes.

    Waits until its sftp-server (which sees the connection drop) has exited too,
    so no write is still queued when the upload resumes. Returns the size left.
    """
    try:
        servers = wait_for(lambda: _children(proc.pid), 10, "sftp-server to start", alive=proc)
        wait_for(
            lambda: target.exists() and target.stat().st_size >= at_least,
            20,
            f"{target.name} to reach {at_least} bytes",
            alive=proc,
        )
    finally:  # never leave the client running, even when the wait failed
        proc.kill()
        proc.wait(timeout=10)
    wait_for(lambda: all(map(_gone, servers)), 10, f"sftp-server {servers} to exit")
    size = target.stat().st_size
    assert at_least <= size < total, f"transfer not interrupted mid-file: {size}/{total} bytes"
    return size


# --- the agent --------------------------------------------------------------------------


class AgentProcess(AgentDaemon):
    """``prep-agent -v run --config CONF`` as a separate process, stopped by SIGTERM."""

    def __init__(self, conf_path: Path) -> None:
        assert Path(PREP_AGENT).is_file(), f"{PREP_AGENT} missing (pip install -e .)"
        super().__init__(conf_path, options=["-v"])

    # observation

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.journal() if e["event"] == name]

    def published(self) -> list[int]:
        """Sequences of the ``cut-published`` events, in journal order."""
        return [e["sequence"] for e in self.events("cut-published")]

    def describe(self) -> str:
        lines = [json.dumps(e) for e in self.journal()]
        return "journal:\n" + "\n".join(lines) + f"\nagent log (tail):\n{self.output()}"

    def wait_event(
        self,
        match: Callable[[dict[str, Any]], bool],
        timeout: float,
        what: str,
        after: int = 0,
    ) -> dict[str, Any]:
        """Wait for the first journal event from index ``after`` on that ``match`` accepts."""

        def find() -> dict[str, Any] | None:
            return next((e for e in self.journal()[after:] if match(e)), None)

        found: dict[str, Any] = wait_for(
            find, timeout, what, alive=self.proc, context=self.describe
        )
        return found

    def wait_published(self, sequence: int, timeout: float = 15) -> dict[str, Any]:
        return self.wait_event(
            lambda e: e["event"] == "cut-published" and e["sequence"] == sequence,
            timeout,
            f"cut {sequence} to be published",
        )

    def assert_current(self, cut: Cut) -> dict[str, Any]:
        """``current`` serves exactly ``cut`` (bytes, signature) and status agrees."""
        current = self.config.current
        assert tree_digest(current) == cut.expected_tree()
        for rel, data in cut.files.items():
            assert (current / rel).read_bytes() == data, rel
        well_known = current / WELL_KNOWN
        assert (well_known / "manifest.json").read_bytes() == cut.manifest
        assert (well_known / "manifest.json.sig").read_bytes() == cut.signature
        status = self.status()
        assert status["sequence"] == cut.sequence
        assert status["cut_time"] == cut.cut_time.isoformat()
        assert status["manifest_sha256"] == cut.manifest_sha256
        assert status["current_path"] == os.path.realpath(current)
        assert status["state"] == "current"
        return status


def verify_with_ssh_keygen(institute: Institute, folder: Path) -> None:
    """Anyone can check a publication with the real ``ssh-keygen -Y verify``."""
    well_known = folder / WELL_KNOWN
    data = (well_known / "manifest.json").read_bytes()
    ssh_verify(institute.allowed_signers, well_known / "manifest.json.sig", data)
