"""Cut stamps inside the data agree with ``cut_time`` (spec prep-cut-v1 §4.7).

A PREP CSV carries its cut on line 2, ``06/06/2021 22:40 (UTC-5)``; a delivery
zip carries it in its name, ``20210606_2240_PREP_GOB_CAMP.zip``. Both must
denote the instant of the manifest's ``cut_time`` truncated to the minute.

Zips, nested ones included, are read within :class:`ZipLimits` and only as far
as the stamps need: the first :data:`HEAD_BYTES` of each CSV member, and the
whole of each nested zip. The module opens no paths: callers hand it bytes or
an open binary file; ``path`` arguments only name things in messages.
"""

from __future__ import annotations

import io
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone, tzinfo
from typing import BinaryIO

from prep_agent.core.errors import STAMP_MISMATCH, ZIP_INVALID, Rejection

HEAD_BYTES = 4096
"""Bytes of a CSV read for its stamp; line 2 must end within them.

A file at least this long whose line 2 does not end within them (a long line 1)
has a stamp that cannot be located: a mismatch, never a file without a stamp.
A file shorter than this is read whole, so its last line needs no line end.
"""

_CHUNK = 64 * 1024
"""Bytes asked of a zip member per read."""
_DIRECTORY_BYTES_PER_ENTRY = 512
"""Central directory bytes allowed per ``max_entries``, checked before parsing it."""
READABLE_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
"""Compression methods zipfile decompresses with bounded output per read."""
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    NotImplementedError,
    RuntimeError,
    ValueError,
    OverflowError,
    OSError,
    struct.error,
)
"""What zipfile raises on a corrupt archive; caught only around zipfile calls."""

_CSV_STAMP = re.compile(
    r"(\d{2})/(\d{2})/(\d{4})[ \t]+(\d{2}):(\d{2})[ \t]*\(UTC([+-])(\d{1,2})(?::(\d{2}))?\)",
    re.ASCII,
)
"""``DD/MM/YYYY HH:MM (UTC±H)``; the offset may also be ``±HH``, ``±H:MM`` or ``±HH:MM``."""
_ZIP_NAME_STAMP = re.compile(
    r"(\d{4})(\d{2})(\d{2})_(\d{2})(\d{2})_PREP.*\.zip", re.ASCII | re.IGNORECASE | re.DOTALL
)
"""A zip basename ``YYYYMMDD_HHMM_PREP*.zip``, in any letter case."""

_EOCD = struct.Struct("<4s4H2LH")
"""ZIP end of central directory record (APPNOTE 4.3.16)."""
_EOCD_SIGNATURE = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
"""ZIP64 end of central directory locator (APPNOTE 4.3.15)."""
_ZIP64_LOCATOR_SIGNATURE = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
"""ZIP64 end of central directory record (APPNOTE 4.3.14)."""
_ZIP64_EOCD_SIGNATURE = b"PK\x06\x06"


@dataclass(frozen=True)
class ZipLimits:
    """Bounds on reading one listed zip (spec §4.7, §4.6: memory stays bounded)."""

    max_depth: int = 3
    """Zips nested inside the listed zip: 1 allows zips in it, but none in those."""
    max_entries: int = 10_000
    """Entries per archive."""
    max_member_bytes: int = 512 * 1024**2
    """Declared, and actual, uncompressed size of one member that is read."""
    max_ratio: int = 200
    """Declared uncompressed / compressed size of one member that is read."""
    max_total_read: int = 64 * 1024**2
    """Bytes actually decompressed in all, nested zips included, for one listed zip."""


DEFAULT_ZIP_LIMITS = ZipLimits()
"""The limits of spec §4.7 when the configuration sets none."""


class InvalidStampError(ValueError):
    """A stamp that cannot be trusted: it has the shape of a cut stamp but denotes no
    valid date, time or offset, or (a CSV's) it cannot be located within the bytes read."""


def parse_csv_stamp(head: bytes) -> datetime | None:
    """Return the instant of the cut stamp on line 2 of a CSV, or None if it has none.

    ``head`` is the start of the file (:data:`HEAD_BYTES` suffice). Lines end
    with LF, CRLF or CR (a UTF-8 BOM, before line 1, does not matter); line 2,
    stripped of whitespace and one pair of surrounding double quotes, must match
    the stamp entirely. Only ASCII matters, so Latin-1 or UTF-8 bytes elsewhere
    are harmless. Raises :class:`InvalidStampError` if line 2 has the shape of a
    stamp but its date, time or offset does not exist (``32/13/2021 22:40
    (UTC-5)``), or if ``head`` holds :data:`HEAD_BYTES` or more and line 2 does
    not end within its first :data:`HEAD_BYTES`: a broken or hidden stamp is a
    mismatch, not a file without a stamp.
    """
    found = _match_csv_stamp(head)
    return None if found is None else _csv_stamp_instant(found)


def parse_zip_name_stamp(name: str, tz: tzinfo) -> datetime | None:
    """Return the instant of a ``YYYYMMDD_HHMM_PREP*.zip`` name read in ``tz``, or None.

    Only the basename counts (after the last ``/`` or ``\\``); letter case is
    ignored. Raises :class:`InvalidStampError` if the digits denote no valid
    date and time (``20211301_2500_PREP.zip``).
    """
    base = re.split(r"[/\\]", name)[-1]
    found = _ZIP_NAME_STAMP.fullmatch(base)
    if found is None:
        return None
    year, month, day, hour, minute = (int(group) for group in found.groups())
    try:
        return datetime(year, month, day, hour, minute, tzinfo=tz)
    except ValueError:
        raise InvalidStampError(f"name stamp {base[:13]} is not a valid date and time") from None


def check_csv(path: str, head: bytes, cut_time: datetime) -> None:
    """Check the stamp on line 2 of the CSV whose start is ``head`` (spec §4.7).

    ``head`` is the first :data:`HEAD_BYTES` of the file, or all of it if shorter.
    A CSV without a stamp passes. Raises :class:`Rejection` ``STAMP_MISMATCH``
    if the stamp is invalid, cannot be located (line 2 does not end within
    :data:`HEAD_BYTES`) or is not ``cut_time`` truncated to the minute, and
    ValueError if ``cut_time`` is naive.
    """
    expected = _truncate_to_minute(cut_time)
    try:
        found = _match_csv_stamp(head)
        if found is None:
            return
        stamp = _csv_stamp_instant(found)
    except InvalidStampError as exc:
        raise Rejection(STAMP_MISMATCH, f"{_printable(path)}: {exc}") from None
    if stamp != expected:
        detail = _disagreement(found.group(0), expected)
        raise Rejection(STAMP_MISMATCH, f"{_printable(path)}: {detail}")


def check_zip(
    path: str, fileobj: BinaryIO, cut_time: datetime, limits: ZipLimits = DEFAULT_ZIP_LIMITS
) -> None:
    """Check the name stamp of a listed zip and the stamps of its CSVs and nested zips.

    ``fileobj`` is the zip, open for binary reading and seekable; it is not
    closed. Names are read in the offset of ``cut_time`` (spec §4.7), so callers
    must keep the offset the manifest gave. Messages name members as
    ``outer.zip!inner.zip!dir/x.csv``. Raises :class:`Rejection`
    ``STAMP_MISMATCH`` on the first stamp that disagrees, ``ZIP_INVALID`` if an
    archive cannot be read within ``limits``, and ValueError if ``cut_time`` is
    naive.
    """
    expected = _truncate_to_minute(cut_time)
    _check_zip_name(path, path, expected)
    _ZipWalk(expected, limits).check_archive(path, fileobj, depth=0)


def check_file(
    path: str, fileobj: BinaryIO, cut_time: datetime, limits: ZipLimits = DEFAULT_ZIP_LIMITS
) -> None:
    """Check one listed file by its extension: ``.csv`` or ``.zip``, in any case.

    Other files pass unread. ``fileobj`` must be seekable: it is read from its
    start whatever its position. Raises as :func:`check_csv` and :func:`check_zip`.
    """
    suffix = path.lower().rpartition(".")[2]
    if suffix == "csv":
        fileobj.seek(0)
        check_csv(path, _read_head(fileobj), cut_time)
    elif suffix == "zip":
        check_zip(path, fileobj, cut_time, limits)


def _match_csv_stamp(head: bytes) -> re.Match[str] | None:
    """Line 2 of ``head``, without whitespace and quotes, matched as a stamp; or None.

    Raises InvalidStampError if line 2 cannot be located (see :func:`_line_2`).
    """
    # A BOM can only precede line 1, so it never touches line 2.
    line = _line_2(head)
    if line is None:
        return None
    text = line.decode("ascii", errors="replace").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return _CSV_STAMP.fullmatch(text)


def _line_2(head: bytes) -> bytes | None:
    """Line 2 of the CSV that starts with ``head``; None if the file has no line 2.

    A ``head`` shorter than :data:`HEAD_BYTES` is the whole file. A longer one
    may have been cut off, so line 2 must end (LF, CR or CRLF) within its first
    :data:`HEAD_BYTES`; otherwise raises InvalidStampError: the stamp, if any,
    lies where it was not read.
    """
    lines = head[:HEAD_BYTES].splitlines(keepends=True)
    if len(head) < HEAD_BYTES:
        return lines[1] if len(lines) >= 2 else None
    if len(lines) >= 3 or (len(lines) == 2 and lines[1].endswith((b"\n", b"\r"))):
        return lines[1]
    raise InvalidStampError(
        f"line 2 does not end within the first {HEAD_BYTES} bytes, "
        "so its cut stamp cannot be checked"
    )


def _csv_stamp_instant(found: re.Match[str]) -> datetime:
    """The instant a matched CSV stamp denotes; InvalidStampError if there is none."""
    day, month, year, hour, minute = (int(group) for group in found.group(1, 2, 3, 4, 5))
    sign, hours, minutes = found.group(6), int(found.group(7)), int(found.group(8) or 0)
    try:
        if minutes >= 60:
            raise ValueError("offset minutes over 59")
        offset = timedelta(hours=hours, minutes=minutes)
        zone = timezone(-offset if sign == "-" else offset)
        return datetime(year, month, day, hour, minute, tzinfo=zone)
    except ValueError:
        text = found.group(0)
        raise InvalidStampError(f"stamp {text} is not a valid date and time") from None


def _truncate_to_minute(cut_time: datetime) -> datetime:
    """``cut_time`` without seconds, in its own offset; ValueError if it is naive."""
    if cut_time.utcoffset() is None:
        raise ValueError("cut_time must be timezone-aware")
    return cut_time.replace(second=0, microsecond=0)


def _disagreement(stamp_text: str, expected: datetime) -> str:
    """Message tail: a stamp that is not the expected cut minute."""
    return f"stamp {stamp_text} is not cut_time {expected.isoformat(timespec='minutes')}"


def _check_zip_name(path: str, name: str, expected: datetime) -> None:
    """Reject the zip at ``path`` if ``name`` has a stamp other than ``expected``."""
    try:
        stamp = parse_zip_name_stamp(name, expected.tzinfo or timezone.utc)
    except InvalidStampError as exc:
        raise Rejection(STAMP_MISMATCH, f"{_printable(path)}: {exc}") from None
    if stamp is not None and stamp != expected:
        text = f"{stamp:%Y%m%d_%H%M}"
        raise Rejection(STAMP_MISMATCH, f"{_printable(path)}: name {_disagreement(text, expected)}")


def _read_head(fileobj: BinaryIO) -> bytes:
    """Up to :data:`HEAD_BYTES` from ``fileobj``, however short its reads are."""
    head = b""
    while len(head) < HEAD_BYTES:
        chunk = fileobj.read(HEAD_BYTES - len(head))
        if not chunk:
            break
        head += chunk
    return head


def _printable(text: str, limit: int = 500) -> str:
    """``text`` fit for a one-line message: control characters escaped, middle cut if long."""
    shown = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    if len(shown) <= limit:
        return shown
    return f"{shown[: limit // 2]}…{shown[-limit // 2 :]}"


def _invalid(path: str, reason: str) -> Rejection:
    """A ``ZIP_INVALID`` rejection of the archive or member at ``path``."""
    return Rejection(ZIP_INVALID, f"{_printable(path)}: {reason}")


def _describe(exc: BaseException) -> str:
    """An exception as a short, one-line phrase."""
    return _printable(str(exc) or type(exc).__name__, limit=200)


def _directory_extent(fileobj: BinaryIO) -> tuple[int, int] | None:
    """Entry count and central directory size the end records declare, or None.

    Finds the records as zipfile does (APPNOTE 4.3.14-16) so that the sizes can
    be bounded before zipfile reads the whole central directory into memory.
    """
    end = fileobj.seek(0, io.SEEK_END)
    start = max(0, end - _EOCD.size - 0xFFFF)
    fileobj.seek(start)
    tail = fileobj.read(end - start)
    at = len(tail) - _EOCD.size
    if not (tail[at : at + 4] == _EOCD_SIGNATURE and tail.endswith(b"\0\0")):
        at = tail.rfind(_EOCD_SIGNATURE)
    if at < 0 or len(tail) - at < _EOCD.size:
        return None
    fields = _EOCD.unpack_from(tail, at)
    return _zip64_extent(fileobj, start + at) or (fields[4], fields[5])


def _zip64_extent(fileobj: BinaryIO, eocd_at: int) -> tuple[int, int] | None:
    """Entry count and directory size from the ZIP64 records before ``eocd_at``, if any."""
    record_at = eocd_at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if record_at < 0:
        return None
    fileobj.seek(record_at)
    data = fileobj.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
    if data[_ZIP64_EOCD.size :][:4] != _ZIP64_LOCATOR_SIGNATURE:
        return None
    fields = _ZIP64_EOCD.unpack_from(data)
    return (fields[7], fields[8]) if fields[0] == _ZIP64_EOCD_SIGNATURE else None


class _ZipWalk:
    """One walk through a listed zip and its nested zips, sharing one read budget."""

    def __init__(self, expected: datetime, limits: ZipLimits) -> None:
        self.expected = expected
        self.limits = limits
        self.bytes_left = limits.max_total_read

    def check_archive(self, path: str, fileobj: BinaryIO, depth: int) -> None:
        """Check every CSV and nested zip member of the archive ``fileobj``."""
        with self._open(path, fileobj) as archive:
            for info in archive.infolist():
                self._check_member(archive, info, f"{path}!{info.filename}", depth)

    def _open(self, path: str, fileobj: BinaryIO) -> zipfile.ZipFile:
        """Open an archive once its end records bound its directory; then count entries."""
        limits = self.limits
        try:
            extent = _directory_extent(fileobj)
        except ZIP_ERRORS as exc:
            raise _invalid(path, f"not a readable zip ({_describe(exc)})") from exc
        if extent is None:
            raise _invalid(path, "not a readable zip (no end of central directory record)")
        if extent[1] > limits.max_entries * _DIRECTORY_BYTES_PER_ENTRY:
            raise _invalid(path, f"central directory of {extent[1]} bytes, too big for max_entries")
        try:
            archive = zipfile.ZipFile(fileobj)
        except ZIP_ERRORS as exc:
            raise _invalid(path, f"not a readable zip ({_describe(exc)})") from exc
        entries = max(extent[0], len(archive.infolist()))
        if entries > limits.max_entries:
            archive.close()
            raise _invalid(path, f"{entries} entries, over max_entries {limits.max_entries}")
        return archive

    def _check_member(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, depth: int
    ) -> None:
        """Check one member: a CSV's head, or a nested zip entirely; others pass unread."""
        suffix = info.filename.lower().rpartition(".")[2]
        if info.is_dir() or suffix not in ("csv", "zip"):
            return
        self._check_declared(info, path)
        if suffix == "csv":
            head = self._read(archive, info, path, HEAD_BYTES).getvalue()
            check_csv(path, head, self.expected)
            return
        if depth + 1 > self.limits.max_depth:
            raise _invalid(
                path, f"zip nested {depth + 1} deep, over max_depth {self.limits.max_depth}"
            )
        _check_zip_name(path, info.filename, self.expected)
        nested = self._read(archive, info, path, self.limits.max_member_bytes + 1)
        if nested.tell() > self.limits.max_member_bytes:
            raise _invalid(path, f"over max_member_bytes {self.limits.max_member_bytes}")
        self.check_archive(path, nested, depth + 1)

    def _check_declared(self, info: zipfile.ZipInfo, path: str) -> None:
        """Reject a member to be read that is encrypted, exotic or declared too big."""
        limits = self.limits
        if info.flag_bits & 0x1:
            raise _invalid(path, "encrypted")
        if info.compress_type not in READABLE_METHODS:
            raise _invalid(path, f"compression method {info.compress_type} (only stored, deflate)")
        if info.file_size > limits.max_member_bytes:
            raise _invalid(
                path,
                f"declares {info.file_size} bytes, over max_member_bytes {limits.max_member_bytes}",
            )
        if info.file_size > limits.max_ratio * info.compress_size:
            raise _invalid(
                path,
                f"declares {info.file_size} bytes from {info.compress_size}, "
                f"over max_ratio {limits.max_ratio}",
            )

    def _read(
        self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str, want: int
    ) -> io.BytesIO:
        """Up to ``want`` decompressed bytes of a member, counted against the budget.

        The buffer is returned positioned at its end, so ``tell()`` is its size.
        """
        buffer = io.BytesIO()
        try:
            with archive.open(info) as member:
                while buffer.tell() < want:
                    chunk = member.read(min(_CHUNK, want - buffer.tell()))
                    if not chunk:
                        break
                    self._spend(path, len(chunk))
                    buffer.write(chunk)
        except ZIP_ERRORS as exc:
            raise _invalid(path, f"cannot be read ({_describe(exc)})") from exc
        return buffer

    def _spend(self, path: str, size: int) -> None:
        """Count ``size`` decompressed bytes; reject once over ``max_total_read``."""
        self.bytes_left -= size
        if self.bytes_left < 0:
            total = self.limits.max_total_read
            raise _invalid(path, f"decompresses beyond max_total_read {total} bytes in all")
