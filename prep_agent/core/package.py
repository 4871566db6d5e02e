"""Checks of a PREP package, the zip an institute publishes for difusores to download.

``YYYYMMDD_HHMM_PREP_<STATE>.zip`` (national: ``YYYYMMDD_HHMM_PREP.zip``) holds,
per election, one CSV, one folder or one inner zip (``..._PREP_GOB_CAMP``,
``..._PREP_DIP_LOC_CAMP``, ``..._PREP_AYUN_CAMP``), each results CSV with its cut
stamp on line 2. :func:`inspect_package` reads the zip from bytes, bounded and
without trusting its headers, and returns every file byte-identical with the one
cut stamp they all agree on; :func:`decide_order` places that stamp after the
last accepted one. Pure: bytes in, values or one-line :class:`Rejection` out.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from enum import Enum

from prep_agent.core.errors import (
    EQUIVOCATION,
    FILE_TYPE,
    LIMIT_EXCEEDED,
    PACKAGE_INVALID,
    PATH_INVALID,
    ROLLBACK,
    STAMP_MISMATCH,
    ZIP_INVALID,
    Rejection,
)
from prep_agent.core.stamps import (
    HEAD_BYTES,
    READABLE_METHODS,
    ZIP_ERRORS,
    InvalidStampError,
    parse_csv_stamp,
    parse_zip_name_stamp,
)


@dataclass(frozen=True)
class PackageLimits:
    """Bounds on reading one package, nested zips included (no header is trusted)."""

    max_entries: int = 5_000
    """Entries in all archives together, folders included."""
    max_total_bytes: int = 512 * 1024**2
    """Bytes decompressed in all, nested zips and their members counted."""
    max_ratio: int = 100
    """Decompressed / compressed size of one member, declared and actual."""
    ratio_floor: int = 1024**2
    """Members decompressing to at most this many bytes are not held to ``max_ratio``."""
    max_nested_zips: int = 64
    """Zips inside the package (each one level deep only)."""
    max_path_chars: int = 512
    """Characters of one entry path."""


DEFAULT_PACKAGE_LIMITS = PackageLimits()
"""The limits used when the configuration sets none."""

ELECTIONS = {
    "GUB": "Gubernatura",
    "DIP_LOC": "Diputaciones locales",
    "AYUN": "Ayuntamientos",
    "JUNTAS": "Juntas municipales",
    "ALC": "Alcaldías",
    "PRES": "Presidencia de la República",
    "DIP_FED": "Diputaciones federales",
    "SEN": "Senadurías",
}
"""Election codes recognised in names, with their Spanish names."""

_ELECTION_WORDS = (
    ("DIPUTACIONES_LOCALES", "DIP_LOC"),
    ("DIPUTACIONES_FEDERALES", "DIP_FED"),
    ("DIP_LOC", "DIP_LOC"),
    ("DIP_FED", "DIP_FED"),
    ("DIPUTACIONES", "DIP_FED"),
    ("GUBERNATURA", "GUB"),
    ("GUB", "GUB"),
    ("GOB", "GUB"),
    ("AYUNTAMIENTOS", "AYUN"),
    ("AYUN", "AYUN"),
    ("JUNTAS", "JUNTAS"),
    ("ALCALDIAS", "ALC"),
    ("ALC", "ALC"),
    ("PRESIDENCIA", "PRES"),
    ("PRES", "PRES"),
    ("SENADURIAS", "SEN"),
    ("SEN", "SEN"),
)
"""Words naming an election in file and folder names, longest first, and their code."""
_ELECTION_NAME = re.compile(
    r"(?:^|[_\-. ])(" + "|".join(word for word, _ in _ELECTION_WORDS) + r")(?=$|[_\-. ])"
)
_NAME_STAMP = re.compile(r"\d{8}_\d{4}_PREP", re.ASCII | re.IGNORECASE)
"""A ``YYYYMMDD_HHMM_PREP`` stamp anywhere in a name."""
PACKAGE_NAME = re.compile(r"\d{8}_\d{4}_PREP(?:_[A-Z0-9]+)*\.zip", re.ASCII)
"""A package's file name as institutes publish it: ``YYYYMMDD_HHMM_PREP[_STATE].zip``
(the stamp in the institute's local time)."""
_CANDIDATES = re.compile(r"CANDIDAT", re.IGNORECASE)
"""Marks a candidates list (``CAMP_GOB_CANDIDATURA_2021.csv``), not a results file."""
_CHUNK = 64 * 1024
_TYPE_MASK = 0o170000
_REGULAR, _DIRECTORY = 0o100000, 0o040000
_SYMLINK = 0o120000


@dataclass(frozen=True)
class ElectionFile:
    """One results CSV of the package and the election it belongs to."""

    path: str
    """Its path among :attr:`Package.entries`."""
    code: str | None
    """Its election code (a key of :data:`ELECTIONS`), None if no name gives it."""
    candidates: str | None
    """Path of the candidates list beside it, if any."""


@dataclass(frozen=True)
class Package:
    """A package that passed every check."""

    name: str
    """The file name it was published under."""
    sha256: str
    """SHA-256 of the zip's bytes, hex."""
    stamp: datetime
    """The cut stamp, aware, in the offset the CSVs state."""
    entries: Mapping[str, bytes]
    """Every file, byte-identical: the zip's own members by their path, and the
    members of each inner zip ``X.zip`` also under ``X/``."""
    elections: tuple[ElectionFile, ...]
    """The results CSVs, in path order."""
    warnings: tuple[str, ...]
    """One-line notes for the operator; none of them stops publication."""

    @property
    def sequence(self) -> int:
        """The stamp as the number ``YYYYMMDDHHMM`` (its wall time in its offset)."""
        return int(self.stamp.strftime("%Y%m%d%H%M"))


def inspect_package(
    name: str, data: bytes, limits: PackageLimits = DEFAULT_PACKAGE_LIMITS
) -> Package:
    """Check the package ``data`` published as ``name`` and return its files and cut stamp.

    Raises :class:`Rejection`: ``path-invalid`` (absolute, ``..``, odd or
    casefold-duplicate paths), ``file-type`` (symlinks, devices),
    ``limit-exceeded`` (entries, total size), ``zip-invalid`` (unreadable,
    encrypted, ratio over the limit, zips nested twice), ``stamp-mismatch``
    (stamps that disagree with each other or with a name) or ``package-invalid``
    (no results CSV with a stamp).
    """
    reader = _Reader(limits)
    reader.read_archive(name, "", data, nested=False)
    _check_duplicates(reader.files, reader.folders)
    warnings: list[str] = []
    elections, stamp = _election_files(reader.files, warnings)
    _check_names(name, reader.folders, stamp, warnings)
    return Package(
        name=name,
        sha256=hashlib.sha256(data).hexdigest(),
        stamp=stamp,
        entries=dict(sorted(reader.files.items())),
        elections=elections,
        warnings=tuple(warnings),
    )


class Order(Enum):
    """Where a package's cut falls after the last accepted one."""

    NEWER = "newer"
    """A later stamp: publish it."""
    REPLAY = "replay"
    """The same stamp and bytes: nothing to do."""
    ROLLBACK = "rollback"
    """An earlier stamp: reject."""
    EQUIVOCATION = "equivocation"
    """The same stamp, other bytes: reject and alarm."""


def decide_order(last: tuple[datetime, str] | None, stamp: datetime, sha256: str) -> Order:
    """Place a package with ``stamp`` and ``sha256`` after ``last`` (stamp, sha256) accepted.

    Stamps are compared as instants; hex digests without regard to case. No
    ``last`` makes any package newer. Raises ValueError if a stamp is naive.
    """
    if stamp.utcoffset() is None or (last is not None and last[0].utcoffset() is None):
        raise ValueError("cut stamps must be timezone-aware")
    if last is None or stamp > last[0]:
        return Order.NEWER
    if stamp < last[0]:
        return Order.ROLLBACK
    return Order.REPLAY if sha256.lower() == last[1].lower() else Order.EQUIVOCATION


def check_order(last: tuple[datetime, str] | None, package: Package) -> bool:
    """True if ``package`` is to be published, False if it replays the last one.

    Raises :class:`Rejection` ``rollback`` for an older stamp and
    ``equivocation`` for the same stamp with other bytes.
    """
    order = decide_order(last, package.stamp, package.sha256)
    if order is Order.ROLLBACK and last is not None:
        raise Rejection(
            ROLLBACK,
            f"{_shown(package.name)}: cut {_iso(package.stamp)} "
            f"is older than the published {_iso(last[0])}",
        )
    if order is Order.EQUIVOCATION:
        raise Rejection(
            EQUIVOCATION,
            f"{_shown(package.name)}: cut {_iso(package.stamp)} already published "
            f"with other bytes (sha256 {package.sha256[:16]}…)",
        )
    return order is Order.NEWER


def package_stamp(name: str) -> str | None:
    """``YYYYMMDDHHMM`` of a package file name (:data:`PACKAGE_NAME`), or None if
    ``name`` is not one or its digits denote no valid date and time. Raises nothing."""
    if PACKAGE_NAME.fullmatch(name) is None:
        return None
    try:
        found = parse_zip_name_stamp(name, timezone.utc)
    except InvalidStampError:
        return None
    return None if found is None else f"{found:%Y%m%d%H%M}"


def election_of(path: str) -> str | None:
    """The election code a path names, looking at its file name first, then its folders.

    Raises nothing; None if no part of the path names one.
    """
    for part in reversed(path.split("/")):
        stem = part.rpartition(".")[0] if "." in part else part
        found = _ELECTION_NAME.search(_plain(stem))
        if found is not None:
            return dict(_ELECTION_WORDS)[found.group(1)]
    return None


def _plain(text: str) -> str:
    """Upper case without the accents Spanish names carry."""
    upper = text.upper()
    for accented, bare in (("Á", "A"), ("É", "E"), ("Í", "I"), ("Ó", "O"), ("Ú", "U")):
        upper = upper.replace(accented, bare)
    return upper


class _Reader:
    """One bounded read of a package and its inner zips, sharing one budget."""

    def __init__(self, limits: PackageLimits) -> None:
        self.limits = limits
        self.files: dict[str, bytes] = {}
        self.folders: set[str] = set()
        self.entries = 0
        self.nested = 0
        self.bytes_left = limits.max_total_bytes

    def read_archive(self, name: str, prefix: str, data: bytes, nested: bool) -> None:
        """Read every member of the zip ``data``, its files stored under ``prefix``."""
        with _open_zip(name, data) as archive:
            self._read_members(name, prefix, archive, len(data), nested)

    def _read_members(
        self, name: str, prefix: str, archive: zipfile.ZipFile, size: int, nested: bool
    ) -> None:
        """Read the members of ``archive``, a zip of ``size`` bytes."""
        infos = archive.infolist()
        self.entries += len(infos)
        if self.entries > self.limits.max_entries:
            raise Rejection(
                LIMIT_EXCEEDED,
                f"{_shown(name)}: over {self.limits.max_entries} entries in the package",
            )
        for info in infos:
            path = prefix + _check_path(name, info.filename, self.limits)
            _check_type(name, info)
            if info.is_dir():
                self.folders.add(path.rstrip("/"))
                continue
            if path in self.files:
                raise Rejection(PATH_INVALID, f"{_shown(name)}!{_shown(path)}: appears twice")
            data = self._read_member(name, archive, info, size)
            self.files[path] = data
            parts = path.split("/")
            self.folders.update("/".join(parts[:end]) for end in range(1, len(parts)))
            if path.lower().endswith(".zip"):
                self._read_nested(name, path, data, nested)

    def _read_nested(self, name: str, path: str, data: bytes, nested: bool) -> None:
        """Read the inner zip at ``path`` into the folder of its name without ``.zip``."""
        where = f"{_shown(name)}!{_shown(path)}"
        if nested:
            raise Rejection(ZIP_INVALID, f"{where}: a zip inside an inner zip (one level only)")
        self.nested += 1
        if self.nested > self.limits.max_nested_zips:
            raise Rejection(
                LIMIT_EXCEEDED, f"{where}: over {self.limits.max_nested_zips} inner zips"
            )
        folder = path[: -len(".zip")]
        self.folders.add(folder)
        self.read_archive(f"{name}!{path}", folder + "/", data, nested=True)

    def _read_member(
        self, name: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int
    ) -> bytes:
        """A member's bytes, read in chunks against the budget and the ratio.

        ``size`` is the archive's: a member cannot declare more compressed bytes
        than lie after its header, which would weaken the ratio check.
        """
        where = f"{_shown(name)}!{_shown(info.filename)}"
        if info.flag_bits & 0x1:
            raise Rejection(ZIP_INVALID, f"{where}: encrypted")
        if info.compress_type not in READABLE_METHODS:
            raise Rejection(
                ZIP_INVALID,
                f"{where}: compression method {info.compress_type} (only stored and deflate)",
            )
        if info.compress_size > size - info.header_offset:
            raise Rejection(
                ZIP_INVALID,
                f"{where}: declares {info.compress_size} compressed bytes, "
                "more than the archive holds",
            )
        self._check_size(where, info.file_size, info.compress_size)
        buffer = io.BytesIO()
        try:
            with archive.open(info) as member:
                while True:
                    chunk = member.read(_CHUNK)
                    if not chunk:
                        break
                    buffer.write(chunk)
                    self._check_size(where, buffer.tell(), info.compress_size)
        except ZIP_ERRORS as exc:
            raise Rejection(ZIP_INVALID, f"{where}: cannot be read ({_said(exc)})") from exc
        self.bytes_left -= buffer.tell()
        return buffer.getvalue()

    def _check_size(self, where: str, size: int, compressed: int) -> None:
        """Reject a member of ``size`` bytes over the budget or the ratio."""
        limits = self.limits
        if size > self.bytes_left:
            raise Rejection(
                LIMIT_EXCEEDED,
                f"{where}: decompresses beyond " f"{limits.max_total_bytes} bytes in the package",
            )
        if size > limits.ratio_floor and size > limits.max_ratio * max(compressed, 1):
            raise Rejection(
                ZIP_INVALID,
                f"{where}: {size} bytes from {compressed} "
                f"compressed, over ratio {limits.max_ratio} (a zip bomb)",
            )


def _open_zip(name: str, data: bytes) -> zipfile.ZipFile:
    """``data`` opened as a zip; ``zip-invalid`` if it is not one."""
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except ZIP_ERRORS as exc:
        raise Rejection(ZIP_INVALID, f"{_shown(name)}: not a readable zip ({_said(exc)})") from exc


def _check_path(name: str, filename: str, limits: PackageLimits) -> str:
    """``filename`` if it is a safe relative path (folders end in ``/``); else rejects."""
    where = f"{_shown(name)}!{_shown(filename)}"
    if len(filename) > limits.max_path_chars:
        raise Rejection(PATH_INVALID, f"{where}: path over {limits.max_path_chars} characters")
    if "\\" in filename or any(not char.isprintable() for char in filename):
        raise Rejection(PATH_INVALID, f"{where}: backslash or control character in the path")
    if filename.startswith("/") or re.match(r"[A-Za-z]:", filename):
        raise Rejection(PATH_INVALID, f"{where}: absolute path")
    parts = filename[:-1].split("/") if filename.endswith("/") else filename.split("/")
    if ".." in parts:
        raise Rejection(PATH_INVALID, f"{where}: '..' in the path (path traversal)")
    if any(part in ("", ".") for part in parts):
        raise Rejection(PATH_INVALID, f"{where}: empty or '.' part in the path")
    return filename


def _check_type(name: str, info: zipfile.ZipInfo) -> None:
    """Reject a member whose Unix mode (external attributes) is not a file or folder."""
    mode = info.external_attr >> 16
    kind = mode & _TYPE_MASK
    if kind in (0, _REGULAR, _DIRECTORY):
        return
    what = "a symbolic link" if kind == _SYMLINK else f"of file type {kind:o}"
    raise Rejection(FILE_TYPE, f"{_shown(name)}!{_shown(info.filename)}: {what}")


def _check_duplicates(files: Mapping[str, bytes], folders: set[str]) -> None:
    """Reject two paths equal after casefold, or a file that is also a folder."""
    seen: dict[str, str] = {}
    for path in sorted([*files, *folders]):
        key = path.casefold()
        if key in seen and seen[key] != path:
            raise Rejection(
                PATH_INVALID,
                f"{_shown(path)} and {_shown(seen[key])}: the same name but for letter case",
            )
        if key in seen and path in files:
            raise Rejection(PATH_INVALID, f"{_shown(path)}: both a file and a folder")
        seen[key] = path


def _election_files(
    files: Mapping[str, bytes], warnings: list[str]
) -> tuple[tuple[ElectionFile, ...], datetime]:
    """The results CSVs and the one stamp they all carry; rejects on disagreement."""
    elections: list[ElectionFile] = []
    stamps: dict[str, datetime] = {}
    for path in sorted(files):
        if not path.lower().endswith(".csv") or _CANDIDATES.search(path.rpartition("/")[2]):
            continue
        code = election_of(path)
        try:
            stamp = parse_csv_stamp(files[path][:HEAD_BYTES])
        except InvalidStampError as exc:
            raise Rejection(STAMP_MISMATCH, f"{_shown(path)}: {exc}") from None
        if stamp is None:
            if code is not None:
                raise Rejection(
                    STAMP_MISMATCH, f"{_shown(path)}: results CSV without a cut stamp on line 2"
                )
            continue
        if code is None:
            warnings.append(f"{_shown(path)}: no election recognised in its name")
        stamps[path] = stamp
        elections.append(ElectionFile(path, code, _candidates_beside(path, code, files)))
    if not stamps:
        raise Rejection(PACKAGE_INVALID, "no results CSV with a cut stamp on line 2")
    first_path, first = next(iter(stamps.items()))
    for path, stamp in stamps.items():
        if _key(stamp) != _key(first):
            raise Rejection(
                STAMP_MISMATCH,
                f"{_shown(path)}: stamp {_iso(stamp)} disagrees "
                f"with {_iso(first)} of {_shown(first_path)}",
            )
    return tuple(elections), first


def _candidates_beside(path: str, code: str | None, files: Mapping[str, bytes]) -> str | None:
    """The candidates CSV in the same folder and of the same election as ``path``."""
    folder = path.rpartition("/")[0]
    for other in sorted(files):
        if other.rpartition("/")[0] != folder or not other.lower().endswith(".csv"):
            continue
        if _CANDIDATES.search(other.rpartition("/")[2]) and election_of(other) == code:
            return other
    return None


def _check_names(name: str, folders: set[str], stamp: datetime, warnings: list[str]) -> None:
    """Reject a stamp in the package's name, or a folder's or inner zip's, other than ``stamp``.

    Names carry no offset; they are read in the CSVs'. A package name without a
    stamp (a fixed URL such as ``latest.zip``) is a warning. Inner zips are
    checked through their folder (``X.zip`` is unpacked under ``X/``).
    """
    zone = stamp.tzinfo or timezone.utc
    base = re.split(r"[/\\]", name)[-1]
    named = [(name, base), *((path, path.rpartition("/")[2]) for path in sorted(folders))]
    for path, part in named:
        found = _name_stamp(path, part, zone)
        if found is None:
            if path is name:
                warnings.append(f"{_shown(base)}: no YYYYMMDD_HHMM_PREP stamp in the name")
            continue
        if _key(found) != _key(stamp):
            raise Rejection(
                STAMP_MISMATCH,
                f"{_shown(path)}: name stamp "
                f"{found:%Y%m%d_%H%M} disagrees with the CSVs' "
                f"{_iso(stamp)}",
            )


def _name_stamp(path: str, part: str, zone: tzinfo) -> datetime | None:
    """The ``YYYYMMDD_HHMM_PREP`` stamp in ``part`` read in ``zone``; rejects invalid dates."""
    found = _NAME_STAMP.search(part)
    if found is None:
        return None
    try:
        return parse_zip_name_stamp(part[found.start() : found.end()] + ".zip", zone)
    except InvalidStampError as exc:
        raise Rejection(STAMP_MISMATCH, f"{_shown(path)}: {exc}") from None


def _key(stamp: datetime) -> tuple[datetime, object]:
    """A stamp compared by wall time and offset, as the text states it."""
    return stamp.replace(tzinfo=None), stamp.utcoffset()


def _iso(stamp: datetime) -> str:
    """A stamp for messages: ``2021-06-07T20:00-05:00``."""
    return stamp.isoformat(timespec="minutes")


def _shown(text: str, limit: int = 300) -> str:
    """``text`` fit for a one-line message: control characters escaped, middle cut if long."""
    shown = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
    return shown if len(shown) <= limit else f"{shown[: limit // 2]}…{shown[-limit // 2 :]}"


def _said(exc: BaseException) -> str:
    """An exception as a short phrase."""
    return _shown(str(exc) or type(exc).__name__, limit=200)
