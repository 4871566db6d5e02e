"""The institute's local check: a cut any difusor would reject never leaves.

:func:`check_cut` reads a cut folder, runs the pure :func:`core.verify.decide`
against the institute's own allowed_signers, election and the last sequence it
distributed (prep-cut-v1 §2–§4.4), then checks every listed file's size and
SHA-256 as the difusor will (§4.5), copying the bytes it hashes into the
store the cut is sent from (``snapshot``). :func:`sign_here` signs a
folder's manifest with key files or with keys held by ``ssh-agent``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from prep_agent.core import sshsig
from prep_agent.core.allowed_signers import AllowedSigner, parse_allowed_signers
from prep_agent.core.errors import (
    FILE_MISMATCH,
    FILE_TYPE,
    INCOMPLETE,
    ConfigError,
    Error,
    Rejection,
    SignatureFormatError,
)
from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME, Manifest, parse_rfc3339
from prep_agent.core.protocol import NAMESPACE_CUT
from prep_agent.core.verify import Policy, Published, decide
from prep_agent.institute.collector.deliveries import DistributedCut
from prep_agent.institute.distribution.snapshot import Snapshots, copy_hashing, discard
from prep_agent.institute.sign import hash_file, load_key


@dataclass(frozen=True)
class LocalCut:
    """A checked cut folder, ready to send."""

    folder: Path
    """The cut folder as the PREP system wrote it."""
    manifest: Manifest
    manifest_sha256: str
    files: dict[str, str]
    """Every listed path → its SHA-256."""
    sizes: dict[str, int]
    ready_at: float
    """When the institute saw it ready (Unix time): the start of every latency."""
    store: Snapshots | None = None
    """Where its verified bytes are kept (None: checked only, never sent)."""
    signature_sha256: str = ""

    @property
    def sequence(self) -> int:
        """The cut's sequence."""
        return self.manifest.sequence

    def local(self, rel: str) -> Path:
        """The file to send as ``rel`` (a listed path, the manifest or the signature):
        its verified bytes in the store."""
        if self.store is None:
            raise Error(f"cut {self.sequence} was checked without keeping its bytes")
        if rel == MANIFEST_NAME:
            return self.store.path(self.manifest_sha256)
        if rel == SIGNATURE_NAME:
            return self.store.path(self.signature_sha256)
        return self.store.path(self.files[rel])

    @property
    def view_name(self) -> str:
        """The name of its view in the store (sequence and manifest)."""
        return f"{self.sequence}-{self.manifest_sha256[:16]}"

    def view(self, send: list[str]) -> Path:
        """A folder holding each of ``send`` under its own path: hard links to
        its verified bytes in the store. Raises ``Error``."""
        if self.store is None:
            raise Error(f"cut {self.sequence} was checked without keeping its bytes")
        return self.store.view(self.view_name, {rel: self.files[rel] for rel in send})

    def hashes(self) -> set[str]:
        """The SHA-256 of every file it sends (what the store must keep for it)."""
        return {*self.files.values(), self.manifest_sha256, self.signature_sha256}


def load_signers(path: Path | None) -> list[AllowedSigner]:
    """The institute's allowed_signers ([distribute] allowed_signers). Raises ``ConfigError``."""
    if path is None:
        raise ConfigError("[distribute] allowed_signers is required to check cuts")
    try:
        return parse_allowed_signers(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read allowed_signers {path}: {exc.strerror}") from None
    except SignatureFormatError as exc:
        raise ConfigError(f"allowed_signers {path}: {exc}") from None


def published_from(last: DistributedCut | None) -> Published:
    """The sequence history the check uses: the last cut distributed acts as published."""
    if last is None:
        return Published()
    return Published(
        sequence=last.sequence,
        cut_time=parse_rfc3339(last.cut_time, "cut_time"),
        highest_sequence=last.sequence,
        highest_manifest_sha256=last.manifest_sha256,
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise Rejection(INCOMPLETE, f"no {what} in {path.parent} (unsigned cut)") from None
    except OSError as exc:
        raise Error(f"cannot read {path}: {exc.strerror}") from None


def _check_files(folder: Path, manifest: Manifest, store: Snapshots | None = None) -> None:
    """§4.5 on the institute's copy: every listed file is there with its bytes.

    With ``store``, each file whose bytes it does not keep yet is copied there
    as it is hashed. Raises ``Rejection`` or ``Error``.
    """
    for entry in manifest.files:
        path = folder / entry.path
        try:  # one lstat: on the critical path of every cut, for every listed file
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise Rejection(INCOMPLETE, f"{entry.path} is listed but missing") from None
        except OSError as exc:
            raise Error(f"cannot read {path}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            raise Rejection(FILE_TYPE, f"{entry.path} is not a regular file")
        partial = None if store is None or store.holds(entry.sha256) else store.partial()
        try:
            size, sha = hash_file(path) if partial is None else copy_hashing(path, partial)
        except OSError as exc:
            if partial is not None:
                discard(partial)
            if isinstance(exc, FileNotFoundError):
                raise Rejection(INCOMPLETE, f"{entry.path} is listed but missing") from None
            if partial is not None:
                raise Error(f"cannot copy {path} into {partial.parent}: {exc.strerror}") from None
            raise Error(f"cannot read {path}: {exc.strerror}") from None
        if (size, sha) != (entry.size, entry.sha256):
            if partial is not None:
                discard(partial)
            raise Rejection(FILE_MISMATCH, f"{entry.path} differs from the manifest")
        if store is not None and partial is not None:
            store.keep(partial, sha)


def check_cut(
    folder: Path,
    policy: Policy,
    last: DistributedCut | None,
    now: datetime,
    ready_at: float,
    store: Snapshots | None = None,
) -> LocalCut:
    """Check ``folder`` as every difusor will; return it ready to send.

    With ``store``, the verified bytes are kept there and the cut is sent from
    them, whatever happens to ``folder`` afterwards (without: a check only,
    e.g. ``--dry-run``). Raises ``Rejection`` (the difusores' reason class) or
    ``Error``.
    """
    manifest_bytes = _read(folder / MANIFEST_NAME, MANIFEST_NAME)
    sig_bytes = _read(folder / SIGNATURE_NAME, SIGNATURE_NAME)
    decision = decide(manifest_bytes, sig_bytes, policy, published_from(last), now)
    manifest = decision.manifest
    _check_files(folder, manifest, store)
    signature_sha256 = "" if store is None else store.keep_bytes(sig_bytes)
    return LocalCut(
        folder=folder,
        manifest=manifest,
        manifest_sha256=(
            hashlib.sha256(manifest_bytes).hexdigest()
            if store is None
            else store.keep_bytes(manifest_bytes)
        ),
        files={f.path: f.sha256 for f in manifest.files},
        sizes={f.path: f.size for f in manifest.files},
        ready_at=ready_at,
        store=store,
        signature_sha256=signature_sha256,
    )


def sign_here(folder: Path, keys: Sequence[Path], agent_keys: Sequence[Path]) -> None:
    """Sign ``folder``'s existing manifest with every key (one SSHSIG block each).

    ``keys`` are unencrypted private key files; ``agent_keys`` are public keys
    whose private halves ``ssh-agent`` holds (``ssh-keygen -Y sign -U``). The
    signature is written last, atomically. Raises ``Error``.
    """
    data = _read(folder / MANIFEST_NAME, MANIFEST_NAME)
    blocks = [sshsig.armor(sshsig.sign(load_key(k), data, NAMESPACE_CUT)) for k in keys]
    blocks += [_agent_sign(k, data) for k in agent_keys]
    tmp = folder / f".{SIGNATURE_NAME}.tmp"
    tmp.write_bytes(b"".join(blocks))
    os.replace(tmp, folder / SIGNATURE_NAME)


def _agent_sign(public_key: Path, data: bytes) -> bytes:
    """One signature by the agent-held key of ``public_key``. Raises ``Error``."""
    if not os.environ.get("SSH_AUTH_SOCK"):
        raise Error("--agent needs a running ssh-agent (SSH_AUTH_SOCK is not set)")
    with tempfile.TemporaryDirectory(prefix="prep-sign-") as work:
        message = Path(work) / "manifest"
        message.write_bytes(data)
        command = ["ssh-keygen", "-q", "-Y", "sign", "-U", "-f", str(public_key)]
        try:
            proc = subprocess.run(
                [*command, "-n", NAMESPACE_CUT, str(message)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
            )
        except FileNotFoundError:
            raise Error("ssh-keygen is not installed") from None
        except subprocess.TimeoutExpired:
            raise Error(f"ssh-agent did not sign with {public_key} within 120 s") from None
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise Error(f"ssh-agent signing with {public_key} failed: {why}")
        return (Path(work) / "manifest.sig").read_bytes()
