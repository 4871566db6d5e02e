"""``prep-agent verify`` on an https-package root: the published package checked again.

A package release keeps what the agent decided on: the zip as downloaded
(``paquete/``), its SHA-256 and stamp (``package.json``) and, when the
institute signed it, its ``.sig`` as published. ``verify_release`` checks,
reading only the release and the trust in force now:

- every file the release's manifest lists has its size and SHA-256 (nothing
  changed on disk since publication);
- the zip's SHA-256 is the one ``package.json`` records;
- the zip still passes the package checks (``core.package.inspect_package``), its
  stamp is the release's, and every entry is under ``archivos/`` byte-identical;
- the kept ``.sig``, if any, verifies over the zip in namespace ``prep-package``
  by ``threshold`` trusted keys, checked at the cut's stamp (a key's validity
  window is judged when the cut was made, not today).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from prep_agent.agent.package_store import FILES_FOLDER, ZIP_FOLDER, read_package_info
from prep_agent.agent.store import Release
from prep_agent.core import sshsig
from prep_agent.core.allowed_signers import AllowedSigner
from prep_agent.core.errors import (
    FILE_MISMATCH,
    SIGNATURE_MALFORMED,
    SIGNATURE_UNTRUSTED,
    STAMP_MISMATCH,
    Error,
    Rejection,
    SignatureFormatError,
)
from prep_agent.core.package import inspect_package
from prep_agent.core.protocol import NAMESPACE_PACKAGE

_CHUNK = 1024**2


@dataclass(frozen=True)
class Verified:
    """What a package release was found to hold."""

    sequence: int
    name: str
    sha256: str
    files: int
    signers: tuple[str, ...] | None
    """Fingerprints of the trusted keys whose kept signature verified; None: no .sig kept."""
    signed_when_published: tuple[str, ...] | None = None
    """The signers ``package.json`` records: for a release of an agent that kept no
    ``.sig`` (before it did), the only word on its signature."""

    def signature_text(self) -> str:
        """How the package was signed, for the operator."""
        if self.signers is not None:
            return f"signed by {', '.join(self.signers)}"
        if self.signed_when_published is not None:
            keys = ", ".join(self.signed_when_published)
            return f"signed by {keys} when published (no .sig kept to check again)"
        return "unsigned"


def verify_release(release: Release, signers: Sequence[AllowedSigner], threshold: int) -> Verified:
    """Check a package release against itself and the current trust (module doc).

    Raises ``Rejection`` (one line: the first thing that does not hold) or
    ``Error`` if the release was not built from a package or is damaged.
    """
    info = read_package_info(release)
    if info is None:
        raise Error(f"release {release.name} holds a drop-folder cut, not a package")
    for entry in release.manifest.files:
        if _digest(release, entry.path) != (entry.size, entry.sha256):
            raise Rejection(FILE_MISMATCH, f"{entry.path} changed since it was published")
    data = _read(release, f"{ZIP_FOLDER}/{info.name}")
    if hashlib.sha256(data).hexdigest() != info.sha256:
        raise Rejection(FILE_MISMATCH, f"{ZIP_FOLDER}/{info.name}: not the package's SHA-256")
    package = inspect_package(info.name, data)
    if package.stamp != datetime.fromisoformat(info.stamp):
        raise Rejection(STAMP_MISMATCH, f"the package's stamp is not {info.stamp}")
    for path, member in package.entries.items():
        if _read(release, f"{FILES_FOLDER}/{path}") != member:
            raise Rejection(FILE_MISMATCH, f"{FILES_FOLDER}/{path} differs from the zip's entry")
    keys = None
    if info.signature is not None:
        keys = _signers(_read(release, info.signature), data, signers, threshold, package.stamp)
    count = len(release.manifest.files)
    return Verified(info.sequence, info.name, info.sha256, count, keys, info.signed_by)


def _signers(
    sig: bytes,
    data: bytes,
    signers: Sequence[AllowedSigner],
    threshold: int,
    when: datetime,
) -> tuple[str, ...]:
    try:
        blocks = sshsig.parse_armored(sig)
    except SignatureFormatError as exc:
        raise Rejection(SIGNATURE_MALFORMED, f"the kept .sig: {exc}") from None
    result = sshsig.count_trusted(blocks, data, signers, NAMESPACE_PACKAGE, when)
    if len(result.keys) < threshold:
        why = "; ".join(result.reasons) or "no block"
        raise Rejection(
            SIGNATURE_UNTRUSTED,
            f"the kept .sig: signed by {len(result.keys)}/{threshold} required trusted keys "
            f"({why})",
        )
    return tuple(key.fingerprint() for key in result.keys)


def _read(release: Release, path: str) -> bytes:
    try:
        return (release.path / path).read_bytes()
    except OSError as exc:
        raise Rejection(FILE_MISMATCH, f"{path}: {exc.strerror}") from None


def _digest(release: Release, path: str) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    try:
        with open(release.path / path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except OSError as exc:
        raise Rejection(FILE_MISMATCH, f"{path}: {exc.strerror}") from None
    return size, digest.hexdigest()
