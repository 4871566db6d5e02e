"""The institute's local check: a cut any difusor would reject never leaves.

:func:`check_cut` reads a cut folder, runs the pure :func:`core.verify.decide`
against the institute's own allowed_signers, election and the last sequence it
distributed (prep-cut-v1 §2–§4.4), then checks every listed file's size and
SHA-256 as the difusor will (§4.5), copying the bytes it hashes into a
snapshot the cut is sent from (``snapshot``). :func:`sign_here` signs a
folder's manifest with key files or with keys held by ``ssh-agent``.
"""

from __future__ import annotations

import hashlib
import os
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
    """What is sent: the snapshot of the verified bytes (or the source, unsent)."""
    source: Path
    """The cut folder as the PREP system wrote it."""
    manifest: Manifest
    manifest_sha256: str
    files: dict[str, str]
    """Every listed path → its SHA-256."""
    sizes: dict[str, int]
    ready_at: float
    """When the institute saw it ready (Unix time): the start of every latency."""

    @property
    def sequence(self) -> int:
        """The cut's sequence."""
        return self.manifest.sequence


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


def _check_files(
    folder: Path,
    manifest: Manifest,
    into: Path | None = None,
    previous: tuple[Path | None, dict[str, str]] = (None, {}),
) -> None:
    """§4.5 on the institute's copy: every listed file is there with its bytes.

    With ``into`` (a snapshot being written), each file is copied there as it
    is hashed, or linked from the ``previous`` snapshot (folder, path →
    SHA-256) when that holds its bytes. Raises ``Rejection`` or ``Error``.
    """
    reuse, known = previous
    for entry in manifest.files:
        path = folder / entry.path
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise Rejection(FILE_TYPE, f"{entry.path} is not a regular file")
        linked = reuse is not None and known.get(entry.path) == entry.sha256
        try:
            if into is None or linked:
                size, sha = hash_file(path)
            else:
                size, sha = copy_hashing(path, into / entry.path)
        except FileNotFoundError:
            raise Rejection(INCOMPLETE, f"{entry.path} is listed but missing") from None
        except OSError as exc:
            raise Error(f"cannot read {path}: {exc.strerror}") from None
        if (size, sha) != (entry.size, entry.sha256):
            raise Rejection(FILE_MISMATCH, f"{entry.path} differs from the manifest")
        if into is not None and reuse is not None and linked:
            _link(reuse / entry.path, into / entry.path)


def _link(source: Path, target: Path) -> None:
    """Hard-link a verified file of the previous snapshot. Raises ``Error``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(source, target)
    except OSError as exc:
        raise Error(f"cannot link {source} into the cut snapshot: {exc.strerror}") from None


def check_cut(
    folder: Path,
    policy: Policy,
    last: DistributedCut | None,
    now: datetime,
    ready_at: float,
    snapshots: Snapshots | None = None,
) -> LocalCut:
    """Check ``folder`` as every difusor will; return it ready to send.

    With ``snapshots``, the verified bytes are kept in a snapshot and the cut
    is sent from there, whatever happens to ``folder`` afterwards (without:
    a check only, e.g. ``--dry-run``). Raises ``Rejection`` (the difusores'
    reason class) or ``Error``.
    """
    manifest_bytes = _read(folder / MANIFEST_NAME, MANIFEST_NAME)
    sig_bytes = _read(folder / SIGNATURE_NAME, SIGNATURE_NAME)
    decision = decide(manifest_bytes, sig_bytes, policy, published_from(last), now)
    manifest = decision.manifest
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    sent = folder
    if snapshots is None:
        _check_files(folder, manifest)
    else:
        sent = snapshots.path(manifest.sequence, manifest_sha256)
        if (sent / SIGNATURE_NAME).is_file():  # the same cut again: already kept
            _check_files(folder, manifest)
        else:
            staging = snapshots.staging(manifest.sequence)
            try:
                _check_files(folder, manifest, staging, snapshots.previous())
            except BaseException:
                discard(staging)
                raise
            snapshots.finish(staging, manifest_bytes, sig_bytes, sent)
    return LocalCut(
        folder=sent,
        source=folder,
        manifest=manifest,
        manifest_sha256=manifest_sha256,
        files={f.path: f.sha256 for f in manifest.files},
        sizes={f.path: f.size for f in manifest.files},
        ready_at=ready_at,
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
