"""OpenSSH signatures (PROTOCOL.sshsig, version 1): parse, check, count, sign.

A pure core in the python-tuf sense: bytes and text in, parsed and checked objects
out, no I/O and the clock passed in as ``now``. It implements prep-cut-v1 §3 (the
cut signature) and health-v1 §3 (the push signature). Keys and their raw
signatures are ``sshkeys``; the trust file is ``allowed_signers``.

Where OpenSSH 9.2 (``ssh-keygen -Y verify``) and this module differ, this module
is the stricter one, so every block it counts is also accepted by ``ssh-keygen``:

- version 0 blobs, which ``ssh-keygen`` reads, are malformed here (version 1 only);
- ``ssh-dss``, ``sk-*`` and certificate keys, and RSA keys under 3072 bits, never
  count; ``cert-authority`` lines of ``allowed_signers`` are skipped;
- base64, option syntax and dates (``20230231``) are parsed strictly.

The reserved field of a blob is read and, as OpenSSH does, not covered by the
signature: the signed data always carries an empty reserved string.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from prep_agent.core.allowed_signers import AllowedSigner, trusted_line
from prep_agent.core.errors import SignatureFormatError
from prep_agent.core.sshkeys import (
    PrivateKey,
    PublicKey,
    decode_key_blob,
    public_key_of,
    sign_raw,
    signature_problem,
    verify_raw,
)
from prep_agent.core.sshwire import Reader, encode_string, strict_b64decode

_MAGIC = b"SSHSIG"
_VERSION = 1
_HASHES = ("sha256", "sha512")
_BEGIN = b"-----BEGIN SSH SIGNATURE-----\n"
_END = b"\n-----END SSH SIGNATURE-----"
_WHITESPACE = b" \t\n\r\v\f"


@dataclass(frozen=True)
class Signature:
    """One parsed SSHSIG blob (its signature not yet checked)."""

    public_key: PublicKey
    namespace: str
    hash_algorithm: str
    signature_type: str
    signature: bytes
    blob: bytes


@dataclass(frozen=True)
class TrustResult:
    """Outcome of ``count_trusted`` over the blocks of one signature file."""

    keys: tuple[PublicKey, ...]
    reasons: tuple[str, ...]


# --- SSHSIG blobs and armor ------------------------------------------------------


def parse_blob(blob: bytes) -> Signature:
    """Parse one binary SSHSIG blob (PROTOCOL.sshsig); raise SignatureFormatError.

    Version 1 only, hash ``sha256`` or ``sha512``, no trailing data.
    """
    reader = Reader(blob, "SSHSIG blob")
    if reader.take(len(_MAGIC)) != _MAGIC:
        raise reader.fail("missing SSHSIG magic")
    version = reader.u32()
    if version != _VERSION:
        raise reader.fail(f"version {version}, expected {_VERSION}")
    public_key = decode_key_blob(reader.string())
    namespace = reader.text()
    reader.string()  # reserved: unused, and not signed by OpenSSH
    hash_algorithm = reader.text()
    if hash_algorithm not in _HASHES:
        raise reader.fail(f"hash algorithm {hash_algorithm!r}")
    signature_type, signature = _parse_signature_field(reader.string())
    reader.end()
    return Signature(public_key, namespace, hash_algorithm, signature_type, signature, blob)


def _parse_signature_field(field: bytes) -> tuple[str, bytes]:
    """Split the ``signature`` field into its type and raw signature bytes."""
    reader = Reader(field, "signature field")
    signature_type = reader.text()
    signature = reader.string()
    if not signature_type.startswith("sk-"):  # sk signatures carry flags and counter
        reader.end()
    return signature_type, signature


def parse_armored(data: bytes) -> list[Signature]:
    """Parse one or more concatenated armored SSHSIG blocks.

    Raise SignatureFormatError if there is no block, if any block is malformed,
    or if anything but whitespace lies outside the blocks.
    """
    signatures: list[Signature] = []
    position = _skip_whitespace(data, 0)
    while position < len(data):
        number = len(signatures) + 1
        if not data.startswith(_BEGIN, position):
            raise SignatureFormatError(f"block {number}: data outside an armored block")
        end = data.find(_END, position + len(_BEGIN))
        if end < 0:
            raise SignatureFormatError(f"block {number}: missing END SSH SIGNATURE line")
        body = data[position + len(_BEGIN) : end]
        signatures.append(_parse_armored_body(body, number))
        position = _skip_whitespace(data, end + len(_END))
    if not signatures:
        raise SignatureFormatError("no SSH SIGNATURE block")
    return signatures


def _skip_whitespace(data: bytes, position: int) -> int:
    """Return the index of the first non-whitespace byte at or after ``position``."""
    while position < len(data) and data[position] in _WHITESPACE:
        position += 1
    return position


def _parse_armored_body(body: bytes, number: int) -> Signature:
    """Decode and parse the base64 body of armored block ``number``."""
    compact = bytes(byte for byte in body if byte not in _WHITESPACE)
    try:
        return parse_blob(strict_b64decode(compact, "armored block"))
    except SignatureFormatError as exc:
        raise SignatureFormatError(f"block {number}: {exc}") from None


def armor(blob: bytes) -> bytes:
    """Armor a binary SSHSIG blob exactly as ``ssh-keygen -Y sign`` writes it."""
    text = base64.b64encode(blob)
    lines = b"".join(text[i : i + 70] + b"\n" for i in range(0, len(text), 70))
    return _BEGIN + lines + _END[1:] + b"\n"


# --- checking ----------------------------------------------------------------------


def check_signature(
    sig: Signature,
    message: bytes,
    signers: Sequence[AllowedSigner],
    namespace: str,
    now: datetime,
) -> tuple[AllowedSigner | None, str]:
    """Decide whether one parsed block counts (prep-cut-v1 §3).

    Return ``(signer, "")`` with the first ``allowed_signers`` line that trusts the
    block, else ``(None, reason)`` with a one-line reason. Trust comes from a line
    whose key equals the embedded key; the line's key is the one used to verify.
    Raise ValueError if ``now`` is naive.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    reason = _unusable_reason(sig, namespace)
    if reason:
        return None, reason
    signer, reason = trusted_line(sig.public_key, signers, namespace, now)
    if signer is None:
        return None, reason
    if not _verifies(signer.key, sig, message, namespace):
        return None, "signature does not verify"
    return signer, ""


def _unusable_reason(sig: Signature, namespace: str) -> str:
    """Return why this block cannot count whatever the trust, or ""."""
    if sig.namespace != namespace:
        return f"namespace {sig.namespace!r} is not {namespace!r}"
    return signature_problem(sig.public_key, sig.signature_type)


def _signed_data(namespace: str, hash_algorithm: str, message: bytes) -> bytes:
    """Build the PROTOCOL.sshsig data that is signed (reserved left empty)."""
    digest = hashlib.new(hash_algorithm, message).digest()
    return (
        _MAGIC
        + encode_string(namespace)
        + encode_string(b"")
        + encode_string(hash_algorithm)
        + encode_string(digest)
    )


def _verifies(key: PublicKey, sig: Signature, message: bytes, namespace: str) -> bool:
    """Check the signature of ``sig`` over ``message`` with the trusted ``key``."""
    data = _signed_data(namespace, sig.hash_algorithm, message)
    return verify_raw(key, sig.signature_type, sig.signature, data)


def count_trusted(
    sigs: Sequence[Signature],
    message: bytes,
    signers: Sequence[AllowedSigner],
    namespace: str,
    now: datetime,
) -> TrustResult:
    """Check every block; return the distinct trusted keys that validly signed.

    Blocks that do not count get a reason ``"block N: …"`` (N from 1).
    """
    keys: list[PublicKey] = []
    reasons: list[str] = []
    for number, sig in enumerate(sigs, start=1):
        signer, reason = check_signature(sig, message, signers, namespace, now)
        if signer is None:
            reasons.append(f"block {number}: {reason}")
        elif signer.key not in keys:
            keys.append(signer.key)
    return TrustResult(tuple(keys), tuple(reasons))


# --- signing -----------------------------------------------------------------------


def sign(
    private_key: PrivateKey, message: bytes, namespace: str, hash_algorithm: str = "sha512"
) -> bytes:
    """Sign ``message`` and return the binary SSHSIG blob (RSA uses rsa-sha2-512).

    Raise ValueError for an empty namespace, an unknown hash or key type.
    """
    if not namespace:
        raise ValueError("namespace must not be empty")
    if hash_algorithm not in _HASHES:
        raise ValueError(f"hash algorithm must be sha256 or sha512, not {hash_algorithm!r}")
    public_key = public_key_of(private_key)
    data = _signed_data(namespace, hash_algorithm, message)
    signature_type, raw = sign_raw(private_key, public_key.key_type, data)
    return (
        _MAGIC
        + struct.pack(">I", _VERSION)
        + encode_string(public_key.blob)
        + encode_string(namespace)
        + encode_string(b"")
        + encode_string(hash_algorithm)
        + encode_string(encode_string(signature_type) + encode_string(raw))
    )
