"""Parsing and validation of ``prep-manifest.json`` (prep-cut-v1 §2, §4.6).

Pure: bytes in, a frozen ``Manifest`` out, or a ``Rejection``.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from prep_agent.core.errors import LIMIT_EXCEEDED, MANIFEST_INVALID, PATH_INVALID, Rejection

FORMAT = "prep-cut/1"
"""The only manifest format this agent accepts."""
MANIFEST_NAME = "prep-manifest.json"
"""Name of the manifest in the drop folder."""
SIGNATURE_NAME = "prep-manifest.json.sig"
"""Name of the signature file; its appearance triggers verification."""
WELL_KNOWN = ".well-known/prep-cut"
"""Folder of a release holding the signed manifest and its signature."""

_KEYS_REQUIRED = {"format", "election", "sequence", "cut_time", "signed_at", "entry", "files"}
_KEYS_OPTIONAL = {"period_seconds", "final", "notice"}
_ELECTION_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})"
)
_DOT_SEGMENT_RE = re.compile(r"(?:^|/)\.{0,2}(?:/|$)")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MAX_SEQUENCE = 2**53
_MAX_SEGMENT_BYTES = 255
_MAX_PATH_BYTES = 4096
_MAX_SEGMENTS = 32
_RESERVED = (MANIFEST_NAME, SIGNATURE_NAME)


@dataclass(frozen=True)
class Limits:
    """Size limits of one cut (prep-cut-v1 §2, §4.6)."""

    max_manifest_bytes: int = 32 * 1024**2
    max_files: int = 200_000
    max_file_bytes: int = 2 * 1024**3
    max_cut_bytes: int = 20 * 1024**3


@dataclass(frozen=True)
class FileEntry:
    """One listed file: its relative path, size and SHA-256 (hex)."""

    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Notice:
    """The institute's signed message for the public page."""

    level: str
    text: str


@dataclass(frozen=True)
class Manifest:
    """A well-formed manifest; times are aware datetimes, texts kept as sent."""

    election: str
    sequence: int
    cut_time: datetime
    cut_time_text: str
    signed_at: datetime
    period_seconds: int
    final: bool
    notice: Notice | None
    entry: str
    files: tuple[FileEntry, ...]

    @property
    def total_bytes(self) -> int:
        """Sum of the listed sizes."""
        return sum(f.size for f in self.files)


def _invalid(detail: str) -> Rejection:
    return Rejection(MANIFEST_INVALID, detail)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _invalid(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise _invalid(f"JSON constant {name} is not allowed")


def load_json(data: bytes) -> Any:
    """Decode strict UTF-8 JSON: no duplicate keys, no NaN/Infinity.

    Raises ``Rejection(MANIFEST_INVALID)``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise _invalid(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise _invalid("JSON nested too deeply") from None


def parse_rfc3339(text: object, key: str) -> datetime:
    """Parse an RFC 3339 date-time that carries an explicit offset.

    Raises ``Rejection(MANIFEST_INVALID)`` naming ``key``.
    """
    if not isinstance(text, str):
        raise _invalid(f"{key} must be a string")
    m = _RFC3339_RE.fullmatch(text)
    if m is None:
        raise _invalid(f"{key} {text!r} is not an RFC 3339 date-time with offset")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    micro = int((m.group(7) or "0")[:6].ljust(6, "0"))
    offset = m.group(8)
    if offset in ("Z", "z"):
        tz = timezone.utc
    else:
        sign = -1 if offset[0] == "-" else 1
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise _invalid(f"{key} {text!r} has an invalid offset")
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        raise _invalid(f"{key} {text!r} is not a valid date-time") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _path_error(path: str, why: str) -> Rejection:
    return Rejection(PATH_INVALID, f"path {path!r}: {why}")


def check_path(path: object) -> str:
    """Check one manifest path against the path rules of §2 (alone).

    Raises ``Rejection(PATH_INVALID)``.
    """
    if not isinstance(path, str):
        raise Rejection(PATH_INVALID, "a path is not a string")
    if not path:
        raise _path_error(path, "empty")
    if _CONTROL_RE.search(path):
        raise _path_error(path, "control character")
    if path.startswith("/"):
        raise _path_error(path, "absolute")
    if "\\" in path:
        raise _path_error(path, "backslash")
    if not path.isascii() and not unicodedata.is_normalized("NFC", path):
        raise _path_error(path, "not Unicode NFC")
    if _DOT_SEGMENT_RE.search(path):
        raise _path_error(path, "empty, '.' or '..' segment")
    if path.count("/") >= _MAX_SEGMENTS:
        raise _path_error(path, f"more than {_MAX_SEGMENTS} segments")
    size = len(path.encode("utf-8"))
    if size > _MAX_PATH_BYTES:
        raise _path_error(path, f"over {_MAX_PATH_BYTES} bytes")
    if size > _MAX_SEGMENT_BYTES and any(
        len(s.encode("utf-8")) > _MAX_SEGMENT_BYTES for s in path.split("/")
    ):
        raise _path_error(path, f"segment over {_MAX_SEGMENT_BYTES} bytes")
    folded = path.casefold()
    if folded in _RESERVED or folded == WELL_KNOWN or folded.startswith(WELL_KNOWN + "/"):
        raise _path_error(path, "reserved name")
    return path


def check_path_set(paths: list[str]) -> None:
    """Reject duplicate, case-colliding and file-versus-directory paths.

    Raises ``Rejection(PATH_INVALID)``.
    """
    seen: dict[str, str] = {}
    for path in paths:
        folded = path.casefold()
        if folded in seen:
            raise _path_error(path, f"collides with {seen[folded]!r}")
        seen[folded] = path
    for path in paths:
        segments = path.casefold().split("/")
        for depth in range(1, len(segments)):
            parent = "/".join(segments[:depth])
            if parent in seen:
                raise _path_error(seen[parent], f"is also a directory of {path!r}")


def _parse_file(item: object, limits: Limits) -> FileEntry:
    if not isinstance(item, dict) or set(item) != {"path", "size", "sha256"}:
        raise _invalid("a files entry must be an object with exactly path, size, sha256")
    path = check_path(item["path"])
    size, digest = item["size"], item["sha256"]
    if not _is_int(size) or size < 0:
        raise _invalid(f"{path!r}: size must be an integer >= 0")
    if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
        raise _invalid(f"{path!r}: sha256 must be 64 lowercase hex digits")
    if size > limits.max_file_bytes:
        raise Rejection(LIMIT_EXCEEDED, f"{path!r}: {size} bytes > max_file_bytes")
    return FileEntry(path, size, digest)


def _parse_files(value: object, limits: Limits) -> tuple[FileEntry, ...]:
    if not isinstance(value, list) or not value:
        raise _invalid("files must be a non-empty array")
    if len(value) > limits.max_files:
        raise Rejection(LIMIT_EXCEEDED, f"{len(value)} files > max_files {limits.max_files}")
    files = tuple(_parse_file(item, limits) for item in value)
    check_path_set([f.path for f in files])
    total = sum(f.size for f in files)
    if total > limits.max_cut_bytes:
        raise Rejection(LIMIT_EXCEEDED, f"{total} bytes > max_cut_bytes {limits.max_cut_bytes}")
    return files


def _parse_notice(value: object) -> Notice | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"level", "text"}:
        raise _invalid("notice must be an object with exactly level and text")
    level, text = value["level"], value["text"]
    if level not in ("info", "interrupted"):
        raise _invalid(f"notice level {level!r} is not info or interrupted")
    if not isinstance(text, str) or len(text) > 500:
        raise _invalid("notice text must be a string of at most 500 characters")
    return Notice(level, text)


def _parse_scalars(obj: dict[str, Any]) -> tuple[str, int, int, bool]:
    if obj["format"] != FORMAT:
        raise _invalid(f"format {obj['format']!r} is not {FORMAT!r}")
    election = obj["election"]
    if not isinstance(election, str) or not _ELECTION_RE.fullmatch(election):
        raise _invalid(f"election {election!r} is not [a-z0-9][a-z0-9-]{{0,63}}")
    sequence = obj["sequence"]
    if not _is_int(sequence) or not 1 <= sequence < _MAX_SEQUENCE:
        raise _invalid(f"sequence {sequence!r} is not an integer in [1, 2^53)")
    period = obj.get("period_seconds", 600)
    if not _is_int(period) or not 60 <= period <= 3600:
        raise _invalid(f"period_seconds {period!r} is not an integer in [60, 3600]")
    final = obj.get("final", False)
    if not isinstance(final, bool):
        raise _invalid("final must be a boolean")
    return election, sequence, period, final


def parse_manifest(data: bytes, limits: Limits) -> Manifest:
    """Parse and validate manifest bytes against every rule of §2 and §4.6.

    Raises ``Rejection`` (MANIFEST_INVALID, PATH_INVALID or LIMIT_EXCEEDED).
    """
    if len(data) > limits.max_manifest_bytes:
        raise Rejection(LIMIT_EXCEEDED, f"manifest of {len(data)} bytes > max_manifest_bytes")
    obj = load_json(data)
    if not isinstance(obj, dict):
        raise _invalid("not a JSON object")
    missing = _KEYS_REQUIRED - set(obj)
    unknown = set(obj) - _KEYS_REQUIRED - _KEYS_OPTIONAL
    if missing:
        raise _invalid(f"missing key(s) {', '.join(sorted(missing))}")
    if unknown:
        raise _invalid(f"unknown key(s) {', '.join(sorted(unknown))}")
    election, sequence, period, final = _parse_scalars(obj)
    cut_time = parse_rfc3339(obj["cut_time"], "cut_time")
    signed_at = parse_rfc3339(obj["signed_at"], "signed_at")
    files = _parse_files(obj["files"], limits)
    entry = obj["entry"]
    if not isinstance(entry, str) or entry not in {f.path for f in files}:
        raise _invalid(f"entry {entry!r} is not one of files")
    return Manifest(
        election=election,
        sequence=sequence,
        cut_time=cut_time,
        cut_time_text=obj["cut_time"],
        signed_at=signed_at,
        period_seconds=period,
        final=final,
        notice=_parse_notice(obj.get("notice")),
        entry=entry,
        files=files,
    )
