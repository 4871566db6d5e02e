"""OpenSSH signatures (PROTOCOL.sshsig, version 1) and ``allowed_signers``.

A pure core in the python-tuf sense: bytes and text in, parsed and checked objects
out, no I/O and the clock passed in as ``now``. It implements prep-cut-v1 §3 (the
cut signature) and health-v1 §3 (the push signature).

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
import binascii
import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from typing import NamedTuple, Union

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from prep_agent.core.errors import SignatureFormatError

MIN_RSA_BITS = 3072
"""Smallest RSA modulus whose signatures count (prep-cut-v1 §3)."""
MAX_RSA_BITS = 16384
"""Largest RSA modulus that parses, as in OpenSSH."""

PrivateKey = Union[ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]
"""The private keys ``sign`` accepts."""
_CryptoPublicKey = Union[ed25519.Ed25519PublicKey, ec.EllipticCurvePublicKey, rsa.RSAPublicKey]

_MAGIC = b"SSHSIG"
_VERSION = 1
_HASHES = ("sha256", "sha512")
_BEGIN = b"-----BEGIN SSH SIGNATURE-----\n"
_END = b"\n-----END SSH SIGNATURE-----"
_WHITESPACE = b" \t\n\r\v\f"
_ED25519 = "ssh-ed25519"
_RSA = "ssh-rsa"
_RSA_SIGNATURE_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "rsa-sha2-256": hashes.SHA256,
    "rsa-sha2-512": hashes.SHA512,
}
_CERT_SUFFIX = "-cert-v01@openssh.com"
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
class AllowedSigner:
    """One usable line of an ``allowed_signers`` file."""

    principals: tuple[str, ...]
    key: PublicKey
    namespaces: tuple[str, ...] | None
    valid_after: datetime | None
    valid_before: datetime | None

    def matches_principal(self, principal: str) -> bool:
        """Tell whether ``principal`` matches the principals pattern-list."""
        return _match_pattern_list(principal, self.principals)

    def allows_namespace(self, namespace: str) -> bool:
        """Tell whether the ``namespaces=`` option (if any) admits ``namespace``."""
        return self.namespaces is None or _match_pattern_list(namespace, self.namespaces)

    def valid_at(self, now: datetime) -> bool:
        """Tell whether ``now`` lies in [valid-after, valid-before], both inclusive."""
        now = now.replace(microsecond=0)  # OpenSSH compares whole seconds
        if self.valid_after is not None and now < self.valid_after:
            return False
        return self.valid_before is None or now <= self.valid_before


@dataclass(frozen=True)
class TrustResult:
    """Outcome of ``count_trusted`` over the blocks of one signature file."""

    keys: tuple[PublicKey, ...]
    reasons: tuple[str, ...]


# --- SSH wire format ---------------------------------------------------------


class _Reader:
    """A cursor over SSH wire-format data; any short or bad read is a format error."""

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def fail(self, problem: str) -> SignatureFormatError:
        """Build the error for ``problem`` in the data being read."""
        return SignatureFormatError(f"malformed {self._what}: {problem}")

    def take(self, size: int) -> bytes:
        """Read exactly ``size`` bytes."""
        if size > len(self._data) - self._pos:
            raise self.fail("truncated")
        self._pos += size
        return self._data[self._pos - size : self._pos]

    def u32(self) -> int:
        """Read a big-endian uint32."""
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def string(self) -> bytes:
        """Read an SSH ``string`` (uint32 length, then bytes)."""
        return self.take(self.u32())

    def text(self) -> str:
        """Read a ``string`` holding UTF-8 text without NUL (a C string in OpenSSH)."""
        raw = self.string()
        if b"\0" in raw:
            raise self.fail("NUL byte in a text field")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("text field is not UTF-8") from None

    def mpint(self) -> int:
        """Read a non-negative ``mpint`` (leading zero bytes tolerated, as OpenSSH)."""
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise self.fail("negative mpint")
        return int.from_bytes(raw, "big")

    def end(self) -> None:
        """Require that all data was read."""
        if self._pos != len(self._data):
            raise self.fail("trailing data")


def _string(value: bytes | str) -> bytes:
    """Encode an SSH ``string``."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def _mpint(value: int) -> bytes:
    """Encode a non-negative SSH ``mpint`` minimally."""
    return _string(value.to_bytes(value.bit_length() // 8 + 1, "big") if value else b"")


def _strict_b64decode(data: bytes, what: str) -> bytes:
    """Decode canonical base64: right alphabet and padding, zero slack bits."""
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureFormatError(f"malformed {what}: bad base64") from None
    if base64.b64encode(decoded) != data:
        raise SignatureFormatError(f"malformed {what}: non-canonical base64")
    return decoded


# --- public keys ---------------------------------------------------------------


def _rejected_key_type(key_type: str) -> str:
    """Return why keys of ``key_type`` never count, or "" for a usable type."""
    if key_type.endswith(_CERT_SUFFIX):
        base = key_type[: -len(_CERT_SUFFIX)]
        if base in _REJECTED_KEY_TYPES or base in _ECDSA or base in (_ED25519, _RSA):
            return f"certificate keys ({key_type}) are not allowed"
    return _REJECTED_KEY_TYPES.get(key_type, "")


def _read_key_fields(key_type: str, reader: _Reader) -> bytes:
    """Check the fields of a usable key; return them canonically encoded."""
    if key_type == _ED25519:
        point = reader.string()
        if len(point) != 32:
            raise reader.fail("Ed25519 key is not 32 bytes")
        return _string(point)
    if key_type in _ECDSA:
        curve = _ECDSA[key_type]
        if reader.text() != curve.name:
            raise reader.fail("curve name does not match key type")
        point = reader.string()
        size = (curve.curve().key_size + 7) // 8
        if len(point) != 1 + 2 * size or point[0] != 4:
            raise reader.fail("not an uncompressed point on the curve")
        return _string(curve.name) + _string(point)
    if key_type == _RSA:
        exponent, modulus = reader.mpint(), reader.mpint()
        if modulus.bit_length() > MAX_RSA_BITS:
            raise reader.fail(f"RSA modulus over {MAX_RSA_BITS} bits")
        return _mpint(exponent) + _mpint(modulus)
    raise reader.fail(f"unknown key type {key_type!r}")


def _decode_key_blob(blob: bytes) -> PublicKey:
    """Parse an SSH public key blob; raise SignatureFormatError if malformed."""
    reader = _Reader(blob, "public key")
    key_type = reader.text()
    if _rejected_key_type(key_type):
        return PublicKey(key_type, blob)
    fields = _read_key_fields(key_type, reader)
    reader.end()
    key = PublicKey(key_type, _string(key_type) + fields)
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


def _split_fields(text: str) -> list[str]:
    """Split on runs of spaces and tabs, as OpenSSH does for key lines."""
    return [field for field in re.split(r"[ \t]+", text.strip(" \t\r\n")) if field]


def parse_public_key(text: str) -> PublicKey:
    """Parse ``"<type> <base64> [comment]"``; raise SignatureFormatError."""
    fields = _split_fields(text)
    if len(fields) < 2:
        raise SignatureFormatError("malformed public key: expected '<type> <base64>'")
    blob = _strict_b64decode(fields[1].encode("ascii", "replace"), "public key")
    key = _decode_key_blob(blob)
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


# --- SSHSIG blobs and armor ------------------------------------------------------


def parse_blob(blob: bytes) -> Signature:
    """Parse one binary SSHSIG blob (PROTOCOL.sshsig); raise SignatureFormatError.

    Version 1 only, hash ``sha256`` or ``sha512``, no trailing data.
    """
    reader = _Reader(blob, "SSHSIG blob")
    if reader.take(len(_MAGIC)) != _MAGIC:
        raise reader.fail("missing SSHSIG magic")
    version = reader.u32()
    if version != _VERSION:
        raise reader.fail(f"version {version}, expected {_VERSION}")
    public_key = _decode_key_blob(reader.string())
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
    reader = _Reader(field, "signature field")
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
        return parse_blob(_strict_b64decode(compact, "armored block"))
    except SignatureFormatError as exc:
        raise SignatureFormatError(f"block {number}: {exc}") from None


def armor(blob: bytes) -> bytes:
    """Armor a binary SSHSIG blob exactly as ``ssh-keygen -Y sign`` writes it."""
    text = base64.b64encode(blob)
    lines = b"".join(text[i : i + 70] + b"\n" for i in range(0, len(text), 70))
    return _BEGIN + lines + _END[1:] + b"\n"


# --- allowed_signers -------------------------------------------------------------


def parse_allowed_signers(text: str, local_tz: tzinfo = timezone.utc) -> list[AllowedSigner]:
    """Parse an OpenSSH ``allowed_signers`` file (ssh-keygen(1), ALLOWED SIGNERS).

    Blank and ``#`` lines and ``cert-authority`` lines are skipped. Times without
    a ``Z``/``UTC`` suffix are local time in OpenSSH; here they are read in
    ``local_tz`` (default UTC). Raise SignatureFormatError naming the line.
    """
    signers: list[AllowedSigner] = []
    for number, line in enumerate(text.split("\n"), start=1):
        try:
            signer = _parse_allowed_line(line.rstrip("\r"), local_tz)
        except SignatureFormatError as exc:
            raise SignatureFormatError(f"allowed_signers line {number}: {exc}") from None
        if signer is not None:
            signers.append(signer)
    return signers


class _Options(NamedTuple):
    cert_authority: bool
    namespaces: tuple[str, ...] | None
    valid_after: datetime | None
    valid_before: datetime | None


def _parse_allowed_line(line: str, local_tz: tzinfo) -> AllowedSigner | None:
    """Parse one line: ``principals [options] keytype base64 [comment]``."""
    rest = line.lstrip(" \t")
    if not rest or rest.startswith("#"):
        return None
    principals, rest = _take_principals(rest)
    options = ""
    if not _is_key_type(_split_fields(rest)[0]):
        options, rest = _take_options(rest)
    key = parse_public_key(rest)
    parsed = _parse_options(options, local_tz)
    if parsed.cert_authority:
        return None  # prep-cut-v1 §3: certificates are not trusted
    return AllowedSigner(
        tuple(principals.split(",")),
        key,
        parsed.namespaces,
        parsed.valid_after,
        parsed.valid_before,
    )


def _is_key_type(name: str) -> bool:
    """Tell whether ``name`` is a key type this module can read."""
    return name in (_ED25519, _RSA) or name in _ECDSA or bool(_rejected_key_type(name))


def _take_principals(text: str) -> tuple[str, str]:
    """Split off the principals field, optionally in double quotes."""
    if text.startswith('"'):
        close = text.find('"', 1)
        if close < 0:
            raise SignatureFormatError("unterminated quote in principals")
        principals, rest = text[1:close], text[close + 1 :]
        if rest and rest[0] not in " \t":
            raise SignatureFormatError("text after the quoted principals")
    else:
        principals = re.split(r"[ \t]", text, maxsplit=1)[0]
        rest = text[len(principals) :]
        if '"' in principals:
            raise SignatureFormatError("stray quote in principals")
    if not principals or not rest.strip(" \t"):
        raise SignatureFormatError("expected 'principals [options] key'")
    return principals, rest.lstrip(" \t")


def _take_options(text: str) -> tuple[str, str]:
    """Split off the options field: up to the first unquoted space or tab."""
    quoted, index = False, 0
    while index < len(text) and (quoted or text[index] not in " \t"):
        if text.startswith('\\"', index):
            index += 1
        elif text[index] == '"':
            quoted = not quoted
        index += 1
    if quoted:
        raise SignatureFormatError("unterminated quote in options")
    return text[:index], text[index:]


def _parse_options(text: str, local_tz: tzinfo) -> _Options:
    """Parse ``cert-authority``, ``namespaces=``, ``valid-after=``, ``valid-before=``.

    Names are case-insensitive and values double-quoted, as in OpenSSH.
    """
    values: dict[str, str] = {}
    cert_authority, position = False, 0
    while position < len(text):
        position, flag = _parse_option(text, position, values)
        cert_authority = cert_authority or flag
        if position == len(text):
            break
        if text[position] != ",":
            raise SignatureFormatError(f"unknown option at {text[position:]!r}")
        position += 1
        if position == len(text):
            raise SignatureFormatError("options end with a comma")
    return _options_from(cert_authority, values, local_tz)


def _parse_option(text: str, position: int, values: dict[str, str]) -> tuple[int, bool]:
    """Read the option at ``position`` into ``values``; tell if it is cert-authority."""
    if _starts_with_name(text, position, "cert-authority"):
        return position + len("cert-authority"), True
    for name in ("namespaces=", "valid-after=", "valid-before="):
        if _starts_with_name(text, position, name):
            if name[:-1] in values:
                raise SignatureFormatError(f"option {name[:-1]} given twice")
            values[name[:-1]], position = _dequote(text, position + len(name))
            break
    return position, False


def _starts_with_name(text: str, position: int, name: str) -> bool:
    """Tell whether ``text`` has the ASCII ``name`` at ``position``, ignoring case."""
    segment = text[position : position + len(name)]
    return segment.isascii() and segment.lower() == name


def _options_from(cert_authority: bool, values: dict[str, str], local_tz: tzinfo) -> _Options:
    """Build the parsed options; valid-before must come after valid-after."""
    after = _parse_time(values["valid-after"], local_tz) if "valid-after" in values else None
    before = _parse_time(values["valid-before"], local_tz) if "valid-before" in values else None
    if after is not None and before is not None and before <= after:
        raise SignatureFormatError("valid-before is not after valid-after")
    namespaces = tuple(values["namespaces"].split(",")) if "namespaces" in values else None
    return _Options(cert_authority, namespaces, after, before)


def _dequote(text: str, position: int) -> tuple[str, int]:
    """Read a double-quoted option value at ``position`` (``\\"`` escapes a quote)."""
    if not text.startswith('"', position):
        raise SignatureFormatError("option value must be in double quotes")
    value: list[str] = []
    position += 1
    while position < len(text) and text[position] != '"':
        if text.startswith('\\"', position):
            position += 1
        value.append(text[position])
        position += 1
    if position == len(text):
        raise SignatureFormatError("missing end quote in option value")
    return "".join(value), position + 1


_TIME = re.compile(r"([0-9]{8}|[0-9]{12}|[0-9]{14})(z|utc)?", re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def _parse_time(value: str, local_tz: tzinfo) -> datetime:
    """Parse ``YYYYMMDD[HHMM[SS]][Z|UTC]`` into an aware UTC datetime."""
    match = _TIME.fullmatch(value)
    if match is None:
        raise SignatureFormatError(f"bad time {value!r}: expected YYYYMMDD[HHMM[SS]][Z]")
    digits = match.group(1).ljust(14, "0")
    year, month, day = int(digits[:4]), int(digits[4:6]), int(digits[6:8])
    hour, minute, second = int(digits[8:10]), int(digits[10:12]), int(digits[12:])
    zone = timezone.utc if match.group(2) else local_tz
    try:
        moment = datetime(year, month, day, hour, minute, second, tzinfo=zone)
        moment = moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise SignatureFormatError(f"bad time {value!r}: no such date") from None
    if moment <= _EPOCH:
        raise SignatureFormatError(f"bad time {value!r}: not after 1970")
    return moment


def _match_pattern_list(value: str, patterns: Sequence[str]) -> bool:
    """OpenSSH ``match_pattern_list``: some pattern matches and no ``!`` one does."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if _match_pattern(value, pattern[1:] if negated else pattern):
            if negated:
                return False
            matched = True
    return matched


def _match_pattern(value: str, pattern: str) -> bool:
    """Match ``*`` (any run) and ``?`` (any one character); all else is literal."""
    index = position = 0
    star, resume = -1, 0
    while index < len(value):
        if position < len(pattern) and pattern[position] == "*":
            star, resume, position = position, index, position + 1
        elif position < len(pattern) and pattern[position] in ("?", value[index]):
            index, position = index + 1, position + 1
        elif star >= 0:
            resume += 1
            index, position = resume, star + 1
        else:
            return False
    return pattern[position:].strip("*") == ""


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
    signer, reason = _trusted_line(sig.public_key, signers, namespace, now)
    if signer is None:
        return None, reason
    if not _verifies(signer.key, sig, message, namespace):
        return None, "signature does not verify"
    return signer, ""


def _unusable_reason(sig: Signature, namespace: str) -> str:
    """Return why this block cannot count whatever the trust, or ""."""
    if sig.namespace != namespace:
        return f"namespace {sig.namespace!r} is not {namespace!r}"
    key_type, signature_type = sig.public_key.key_type, sig.signature_type
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
    bits = _rsa_bits(sig.public_key)
    return f"RSA key of {bits} bits < {MIN_RSA_BITS}" if bits < MIN_RSA_BITS else ""


def _rsa_bits(key: PublicKey) -> int:
    """Return the modulus size of an RSA key."""
    loaded = _crypto_key(key)
    return loaded.key_size if isinstance(loaded, rsa.RSAPublicKey) else 0


def _trusted_line(
    key: PublicKey, signers: Sequence[AllowedSigner], namespace: str, now: datetime
) -> tuple[AllowedSigner | None, str]:
    """Find the first line with ``key`` whose options admit ``namespace`` at ``now``."""
    lines = [signer for signer in signers if signer.key == key]
    if not lines:
        return None, f"key {key.fingerprint()} not in allowed_signers"
    lines = [signer for signer in lines if signer.allows_namespace(namespace)]
    if not lines:
        return None, f"namespace not allowed for key {key.fingerprint()}"
    for signer in lines:
        if signer.valid_at(now):
            return signer, ""
    return None, f"key {key.fingerprint()} not valid at {_iso(now)} ({_window(lines[0])})"


def _iso(moment: datetime) -> str:
    """Format an aware datetime as ``YYYY-MM-DDTHH:MM:SSZ``."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _window(signer: AllowedSigner) -> str:
    """Describe the validity window of a line."""
    parts = []
    if signer.valid_after is not None:
        parts.append(f"valid-after {_iso(signer.valid_after)}")
    if signer.valid_before is not None:
        parts.append(f"valid-before {_iso(signer.valid_before)}")
    return ", ".join(parts)


def _signed_data(namespace: str, hash_algorithm: str, message: bytes) -> bytes:
    """Build the PROTOCOL.sshsig data that is signed (reserved left empty)."""
    digest = hashlib.new(hash_algorithm, message).digest()
    return _MAGIC + _string(namespace) + _string(b"") + _string(hash_algorithm) + _string(digest)


def _verifies(key: PublicKey, sig: Signature, message: bytes, namespace: str) -> bool:
    """Check the signature of ``sig`` over ``message`` with the trusted ``key``."""
    data = _signed_data(namespace, sig.hash_algorithm, message)
    try:
        loaded = _crypto_key(key)
        if isinstance(loaded, ed25519.Ed25519PublicKey):
            loaded.verify(sig.signature, data)
        elif isinstance(loaded, ec.EllipticCurvePublicKey):
            algorithm = ec.ECDSA(_ECDSA[key.key_type].digest())
            loaded.verify(_ecdsa_der(sig.signature), data, algorithm)
        else:
            raw = _rsa_padded(sig.signature, loaded.key_size)
            algorithm_hash = _RSA_SIGNATURE_HASHES[sig.signature_type]()
            loaded.verify(raw, data, padding.PKCS1v15(), algorithm_hash)
    except (InvalidSignature, SignatureFormatError, ValueError, KeyError):
        return False
    return True


def _ecdsa_der(raw: bytes) -> bytes:
    """Convert SSH ``mpint r, mpint s`` to the DER form ``cryptography`` verifies."""
    reader = _Reader(raw, "ECDSA signature")
    r, s = reader.mpint(), reader.mpint()
    reader.end()
    return encode_dss_signature(r, s)


def _rsa_padded(raw: bytes, bits: int) -> bytes:
    """Left-pad a short RSA signature to the modulus length, as OpenSSH does."""
    size = (bits + 7) // 8
    if len(raw) > size:
        raise SignatureFormatError("RSA signature longer than the modulus")
    return raw.rjust(size, b"\0")


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


def _as_private_key(key: object) -> PrivateKey:
    """Return ``key`` if it is Ed25519, ECDSA P-256/384/521 or RSA; else raise ValueError."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise ValueError(f"unsupported curve {key.curve.name}")
        return key
    if isinstance(key, (ed25519.Ed25519PrivateKey, rsa.RSAPrivateKey)):
        return key
    raise ValueError(f"unsupported private key type {type(key).__name__}")


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
    signature_type, raw = _sign_raw(private_key, public_key.key_type, data)
    return (
        _MAGIC
        + struct.pack(">I", _VERSION)
        + _string(public_key.blob)
        + _string(namespace)
        + _string(b"")
        + _string(hash_algorithm)
        + _string(_string(signature_type) + _string(raw))
    )


def _sign_raw(private_key: PrivateKey, key_type: str, data: bytes) -> tuple[str, bytes]:
    """Return the SSH signature type and raw signature bytes over ``data``."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return key_type, private_key.sign(data)
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        der = private_key.sign(data, ec.ECDSA(_ECDSA[key_type].digest()))
        r, s = decode_dss_signature(der)
        return key_type, _mpint(r) + _mpint(s)
    return "rsa-sha2-512", private_key.sign(data, padding.PKCS1v15(), hashes.SHA512())


def load_private_key(data: bytes) -> PrivateKey:
    """Load an unencrypted ``-----BEGIN OPENSSH PRIVATE KEY-----`` key.

    Raise SignatureFormatError if it does not parse, is encrypted, or is not
    Ed25519, ECDSA P-256/384/521 or RSA.
    """
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureFormatError(f"not an unencrypted OpenSSH private key: {exc}") from None
    try:
        return _as_private_key(key)
    except ValueError as exc:
        raise SignatureFormatError(str(exc)) from None
