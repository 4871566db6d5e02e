"""SSH public and private keys: blobs, the one-line form, fingerprints, raw signatures.

Pure, no I/O. The key side of prep-cut-v1 §3: which key types count, how their
blobs are parsed, and how one raw signature of each algorithm is made and
checked. The SSHSIG envelope around those raw signatures is ``sshsig``.

Where OpenSSH 9.2 and this module differ, this module is the stricter one:
``ssh-dss``, ``sk-*`` and certificate keys, and RSA keys under 3072 bits, never
count; RSA signatures must be ``rsa-sha2-256`` or ``rsa-sha2-512``; base64 is
parsed strictly.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from typing import NamedTuple, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from prep_agent.core.errors import SignatureFormatError
from prep_agent.core.sshwire import Reader, encode_mpint, encode_string, strict_b64decode

MIN_RSA_BITS = 3072
"""Smallest RSA modulus whose signatures count (prep-cut-v1 §3)."""
MAX_RSA_BITS = 16384
"""Largest RSA modulus that parses, as in OpenSSH."""

PrivateKey = Union[ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
"""The private keys ``sshsig.sign`` accepts."""
_CryptoPublicKey = Union[ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey, rsa.RSAPublicKey]

_ED25519 = "ssh-ed25519"
_RSA = "ssh-rsa"
_RSA_SIGNATURE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "rsa-sha2-256": hashes.SHA256,
    "rsa-sha2-512": hashes.SHA512,
}
_CERT_SUFFIX = "-cert-v01@openssh.com"
_PRIVATE_BEGIN = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_PRIVATE_END = b"-----END OPENSSH PRIVATE KEY-----"
_PRIVATE_MAGIC = b"openssh-key-v1\0"
_REJECTED_KEY_TYPES = {
    "ssh-dss": "DSA keys are not allowed",
    "sk-ssh-ed25519@openssh.com": "security-key (sk-*) keys are not allowed",
    "sk-ecdsa-sha2-nistp256@openssh.com": "security-key (sk-*) keys are not allowed",
}


class _Curve(NamedTuple):
    name: str
    curve: type[ec.EllipticCurve]
    digest: type[hashes.HashAlgorithm]


_ECDSA = {
    "ecdsa-sha2-nistp256": _Curve("nistp256", ec.SECP256R1, hashes.SHA256),
    "ecdsa-sha2-nistp384": _Curve("nistp384", ec.SECP384R1, hashes.SHA384),
    "ecdsa-sha2-nistp521": _Curve("nistp521", ec.SECP521R1, hashes.SHA512),
}


@dataclass(frozen=True)
class PublicKey:
    """An SSH public key; ``blob`` is its canonical SSH wire encoding.

    Keys of the rejected families (DSA, ``sk-*``, certificates) are kept as read,
    so that they can be reported, but are never used to verify.
    """

    key_type: str
    blob: bytes

    def fingerprint(self) -> str:
        """Return the ``SHA256:…`` fingerprint, as ``ssh-keygen -l`` prints it."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    def openssh(self) -> str:
        """Return the one-line OpenSSH form ``"<type> <base64>"``."""
        return f"{self.key_type} {base64.b64encode(self.blob).decode('ascii')}"


# --- public keys ---------------------------------------------------------------


def _rejected_key_type(key_type: str) -> str:
    """Return why keys of ``key_type`` never count, or "" for a usable type."""
    if key_type.endswith(_CERT_SUFFIX):
        base = key_type[: -len(_CERT_SUFFIX)]
        if base in _REJECTED_KEY_TYPES or base in _ECDSA or base in (_ED25519, _RSA):
            return f"certificate keys ({key_type}) are not allowed"
    return _REJECTED_KEY_TYPES.get(key_type, "")


def is_key_type(name: str) -> bool:
    """Tell whether ``name`` is a key type this module can read (usable or rejected)."""
    return name in (_ED25519, _RSA) or name in _ECDSA or bool(_rejected_key_type(name))


def _read_key_fields(key_type: str, reader: Reader) -> bytes:
    """Check the fields of a usable key; return them canonically encoded."""
    if key_type == _ED25519:
        point = reader.string()
        if len(point) != 32:
            raise reader.fail("Ed25519 key is not 32 bytes")
        return encode_string(point)
    if key_type in _ECDSA:
        curve = _ECDSA[key_type]
        if reader.text() != curve.name:
            raise reader.fail("curve name does not match key type")
        point = reader.string()
        size = (curve.curve().key_size + 7) // 8
        if len(point) != 1 + 2 * size or point[0] != 4:
            raise reader.fail("not an uncompressed point on the curve")
        return encode_string(curve.name) + encode_string(point)
    if key_type == _RSA:
        exponent, modulus = reader.mpint(), reader.mpint()
        if modulus.bit_length() > MAX_RSA_BITS:
            raise reader.fail(f"RSA modulus over {MAX_RSA_BITS} bits")
        return encode_mpint(exponent) + encode_mpint(modulus)
    raise reader.fail(f"unknown key type {key_type!r}")


def decode_key_blob(blob: bytes) -> PublicKey:
    """Parse an SSH public key blob; raise SignatureFormatError if malformed.

    Keys of a rejected type are returned as read, unchecked.
    """
    reader = Reader(blob, "public key")
    key_type = reader.text()
    if _rejected_key_type(key_type):
        return PublicKey(key_type, blob)
    fields = _read_key_fields(key_type, reader)
    reader.end()
    key = PublicKey(key_type, encode_string(key_type) + fields)
    _crypto_key(key)  # the curve point or RSA numbers must load
    return key


def _crypto_key(key: PublicKey) -> _CryptoPublicKey:
    """Load a usable key into ``cryptography``; raise SignatureFormatError."""
    try:
        loaded = serialization.load_ssh_public_key(key.openssh().encode("ascii"))
    except (ValueError, UnsupportedAlgorithm, NotImplementedError) as exc:
        raise SignatureFormatError(f"malformed public key: {exc}") from None
    if not isinstance(
        loaded, (ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey, rsa.RSAPublicKey)
    ):
        raise SignatureFormatError(f"unsupported key type {key.key_type!r}")
    return loaded


def split_fields(text: str) -> list[str]:
    """Split on runs of spaces and tabs, as OpenSSH does for key lines."""
    return [field for field in re.split(r"[ \t]+", text.strip(" \t\r\n")) if field]


def parse_public_key(text: str) -> PublicKey:
    """Parse ``"<type> <base64> [comment]"``; raise SignatureFormatError."""
    fields = split_fields(text)
    if len(fields) < 2:
        raise SignatureFormatError("malformed public key: expected '<type> <base64>'")
    blob = strict_b64decode(fields[1].encode("ascii", "replace"), "public key")
    key = decode_key_blob(blob)
    if key.key_type != fields[0]:
        raise SignatureFormatError(
            f"malformed public key: type {fields[0]!r} but blob holds {key.key_type!r}"
        )
    return key


def public_key_of(private_key: PrivateKey) -> PublicKey:
    """Return the public half of ``private_key``; raise ValueError if unsupported."""
    line = (
        _as_private_key(private_key)
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return parse_public_key(line.decode("ascii"))


# --- raw signatures ----------------------------------------------------------------


def signature_problem(key: PublicKey, signature_type: str) -> str:
    """Return why a ``signature_type`` signature by ``key`` never counts, or ""."""
    key_type = key.key_type
    rejected = _rejected_key_type(key_type)
    if rejected:
        return rejected
    if key_type != _RSA:
        if signature_type != key_type:
            return f"signature type {signature_type} does not match key type {key_type}"
        return ""
    if signature_type == "ssh-rsa":
        return "key type ssh-rsa signature (SHA-1) not allowed"
    if signature_type not in _RSA_SIGNATURE_HASHES:
        return f"signature type {signature_type} does not match key type {key_type}"
    bits = _rsa_bits(key)
    return f"RSA key of {bits} bits < {MIN_RSA_BITS}" if bits < MIN_RSA_BITS else ""


def _rsa_bits(key: PublicKey) -> int:
    """Return the modulus size of an RSA key."""
    loaded = _crypto_key(key)
    return loaded.key_size if isinstance(loaded, rsa.RSAPublicKey) else 0


def verify_raw(key: PublicKey, signature_type: str, signature: bytes, data: bytes) -> bool:
    """Tell whether the raw SSH ``signature`` by ``key`` over ``data`` is valid.

    ``signature_type`` picks the RSA hash. Never raises: a malformed key or
    signature does not verify.
    """
    try:
        loaded = _crypto_key(key)
        if isinstance(loaded, ed25519.Ed25519PublicKey):
            loaded.verify(signature, data)
        elif isinstance(loaded, ec.EllipticCurvePublicKey):
            algorithm = ec.ECDSA(_ECDSA[key.key_type].digest())
            loaded.verify(_ecdsa_der(signature), data, algorithm)
        else:
            raw = _rsa_padded(signature, loaded.key_size)
            algorithm_hash = _RSA_SIGNATURE_HASHES[signature_type]()
            loaded.verify(raw, data, padding.PKCS1v15(), algorithm_hash)
    except (InvalidSignature, SignatureFormatError, ValueError, KeyError):
        return False
    return True


def _ecdsa_der(raw: bytes) -> bytes:
    """Convert SSH ``mpint r, mpint s`` to the DER form ``cryptography`` verifies."""
    reader = Reader(raw, "ECDSA signature")
    r, s = reader.mpint(), reader.mpint()
    reader.end()
    return encode_dss_signature(r, s)


def _rsa_padded(raw: bytes, bits: int) -> bytes:
    """Left-pad a short RSA signature to the modulus length, as OpenSSH does."""
    size = (bits + 7) // 8
    if len(raw) > size:
        raise SignatureFormatError("RSA signature longer than the modulus")
    return raw.rjust(size, b"\0")


def sign_raw(private_key: PrivateKey, key_type: str, data: bytes) -> tuple[str, bytes]:
    """Return the SSH signature type and raw signature bytes over ``data``.

    ``key_type`` is the SSH type of ``private_key``; RSA signs with rsa-sha2-512.
    Raise KeyError if an ECDSA ``key_type`` is not one of the three curves.
    """
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return key_type, private_key.sign(data)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        der = private_key.sign(data, ec.ECDSA(_ECDSA[key_type].digest()))
        r, s = decode_dss_signature(der)
        return key_type, encode_mpint(r) + encode_mpint(s)
    return "rsa-sha2-512", private_key.sign(data, padding.PKCS1v15(), hashes.SHA512())


# --- private keys ------------------------------------------------------------------


def _as_private_key(key: object) -> PrivateKey:
    """Return ``key`` if it is Ed25519, ECDSA P-256/384/521 or RSA; else raise ValueError."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise ValueError(f"unsupported curve {key.curve.name}")
        return key
    if isinstance(key, (ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        return key
    raise ValueError(f"unsupported private key type {type(key).__name__}")


def _private_key_type(data: bytes) -> str | None:
    """The key type in the public part of an OpenSSH private key file (PROTOCOL.key),
    which is never encrypted; None if that part cannot be read."""
    begin, end = data.find(_PRIVATE_BEGIN), data.find(_PRIVATE_END)
    if begin < 0 or end < begin:
        return None
    try:
        raw = base64.b64decode(b"".join(data[begin + len(_PRIVATE_BEGIN) : end].split()))
    except ValueError:
        return None
    if not raw.startswith(_PRIVATE_MAGIC):
        return None
    reader = Reader(raw[len(_PRIVATE_MAGIC) :], "private key")
    try:
        for _field in ("cipher", "KDF", "KDF options"):
            reader.string()
        if reader.u32() < 1:
            return None
        return Reader(reader.string(), "public key").text()
    except SignatureFormatError:
        return None


def load_private_key(data: bytes) -> PrivateKey:
    """Load an unencrypted ``-----BEGIN OPENSSH PRIVATE KEY-----`` key.

    Raise SignatureFormatError if it does not parse, is encrypted, or is not
    Ed25519, ECDSA P-256/384/521 or RSA. A key of a type that never counts
    (DSA, ``sk-*``) is refused from its public part, before ``cryptography``
    loads it (from cryptography 40, loading a DSA key warns that it is deprecated).
    """
    problem = _rejected_key_type(_private_key_type(data) or "")
    if problem:
        raise SignatureFormatError(problem)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureFormatError(f"not an unencrypted OpenSSH private key: {exc}") from None
    try:
        return _as_private_key(key)
    except ValueError as exc:
        raise SignatureFormatError(str(exc)) from None
