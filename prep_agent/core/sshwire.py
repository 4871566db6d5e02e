"""The SSH wire format (RFC 4251 §5) and strict base64, as the SSH modules read them.

Pure: bytes in, values out. Every short or bad read is a SignatureFormatError,
since everything read here comes from a signature, a key or a trust file.
"""

from __future__ import annotations

import base64
import binascii
import struct

from prep_agent.core.errors import SignatureFormatError


class Reader:
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


def encode_string(value: bytes | str) -> bytes:
    """Encode an SSH ``string`` (``str`` as UTF-8)."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def encode_mpint(value: int) -> bytes:
    """Encode a non-negative SSH ``mpint`` minimally."""
    return encode_string(value.to_bytes(value.bit_length() // 8 + 1, "big") if value else b"")


def strict_b64decode(data: bytes, what: str) -> bytes:
    """Decode canonical base64: right alphabet and padding, zero slack bits.

    Raise SignatureFormatError naming ``what`` if ``data`` is not canonical.
    """
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureFormatError(f"malformed {what}: bad base64") from None
    if base64.b64encode(decoded) != data:
        raise SignatureFormatError(f"malformed {what}: non-canonical base64")
    return decoded
