"""Tests of prep_agent.stamps: cut stamps inside CSVs and zips (spec §4.7)."""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pytest

from prep_agent.core.errors import STAMP_MISMATCH, ZIP_INVALID, Rejection
from prep_agent.core.stamps import (
    DEFAULT_ZIP_LIMITS,
    HEAD_BYTES,
    InvalidStampError,
    ZipLimits,
    check_csv,
    check_file,
    check_zip,
    parse_csv_stamp,
    parse_zip_name_stamp,
)

pytestmark = pytest.mark.core

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "prep-real"
CAMPECHE_CUTS = REAL / "campeche-2021-cuts"
CAMPECHE_ZIP = REAL / "campeche-2021-20210601_1852_PREP_CAMP.zip"
UTC_5 = timezone(timedelta(hours=-5))
UTC_7 = timezone(timedelta(hours=-7))
ZIP_CUT = datetime(2021, 6, 1, 18, 52, tzinfo=UTC_5)
"""The cut of the real delivery zip: its inner zip names and CSV stamps."""
CUT = datetime(2021, 6, 6, 22, 40, tzinfo=UTC_5)
STAMP = b"06/06/2021 22:40 (UTC-5)"


def real_stamped_csvs() -> list[Path]:
    """The real Campeche result CSVs (the CANDIDATURA ones carry no stamp)."""
    found = sorted(CAMPECHE_CUTS.glob("*/*.csv"))
    return [path for path in found if "CANDIDATURA" not in path.name]


def folder_time(csv: Path) -> datetime:
    """The cut time in a Campeche folder name ``YYYYMMDD_HHMM_PREP_...``, in UTC-5."""
    return datetime.strptime(csv.parent.name[:13], "%Y%m%d_%H%M").replace(tzinfo=UTC_5)


def csv_bytes(line2: bytes, newline: bytes = b"\n", line1: bytes = b"GUBERNATURA") -> bytes:
    """A small PREP-like CSV whose second line is ``line2``."""
    return newline.join([line1, line2, b"ACTAS_ESPERADAS,ACTAS_REGISTRADAS", b"10,9", b""])


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """An in-memory zip holding ``members``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def run_zip(data: bytes, cut: datetime = CUT, limits: ZipLimits = DEFAULT_ZIP_LIMITS) -> None:
    """check_zip on an in-memory zip named without a stamp."""
    check_zip("cut/delivery.zip", io.BytesIO(data), cut, limits)


def rejection(
    call: Callable[..., object], *args: object, reason: str, **kwargs: object
) -> Rejection:
    """The Rejection that ``call(*args, **kwargs)`` raises, asserting its reason class."""
    with pytest.raises(Rejection) as caught:
        call(*args, **kwargs)
    assert caught.value.reason == reason, caught.value
    assert "\n" not in str(caught.value)
    return caught.value


def patch_central_entry(data: bytes, name: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``data`` with one field of the central directory entry of ``name`` replaced."""
    at = data.index(b"PK\x01\x02")
    while data[at + 46 : at + 46 + len(name)] != name:
        at = data.index(b"PK\x01\x02", at + 4)
    patched = bytearray(data)
    struct.pack_into(fmt, patched, at + offset, value)
    return bytes(patched)


# --- CSV stamps on real files ---------------------------------------------------------------


def test_real_fixtures_are_present() -> None:
    assert len(real_stamped_csvs()) == 24
    assert CAMPECHE_ZIP.is_file()


@pytest.mark.parametrize("csv", real_stamped_csvs(), ids=lambda path: path.parent.name)
def test_real_campeche_csv_matches_its_folder_time(csv: Path) -> None:
    head = csv.read_bytes()[:HEAD_BYTES]
    cut = folder_time(csv)
    assert parse_csv_stamp(head) == cut
    check_csv(str(csv), head, cut)
    check_csv(str(csv), head, cut.replace(second=59, microsecond=999_999))
    error = rejection(check_csv, "x.csv", head, cut + timedelta(minutes=1), reason=STAMP_MISMATCH)
    assert error.detail.startswith("x.csv: stamp ")


def test_real_candidatura_csvs_have_no_stamp() -> None:
    found = sorted(CAMPECHE_CUTS.glob("*/*CANDIDATURA*.csv"))
    assert found
    for csv in found:
        head = csv.read_bytes()[:HEAD_BYTES]
        assert parse_csv_stamp(head) is None
        check_csv(str(csv), head, CUT + timedelta(days=400))


@pytest.mark.parametrize("csv", sorted((REAL / "sonora-2021").glob("*.csv")), ids=str)
def test_real_sonora_csv_with_bom_and_quotes(csv: Path) -> None:
    head = csv.read_bytes()[:HEAD_BYTES]
    assert head.startswith(b"\xef\xbb\xbf")
    local = datetime(2021, 6, 7, 13, 19, tzinfo=UTC_7)
    assert parse_csv_stamp(head) == local
    check_csv(csv.name, head, local)
    check_csv(csv.name, head, datetime(2021, 6, 7, 15, 19, 30, tzinfo=UTC_5))
    check_csv(csv.name, head, datetime(2021, 6, 7, 20, 19, tzinfo=timezone.utc))
    rejection(check_csv, csv.name, head, local - timedelta(minutes=1), reason=STAMP_MISMATCH)


# --- CSV stamp forms ---------------------------------------------------------------------------


def test_mismatch_message_names_path_stamp_and_cut_minute() -> None:
    head = csv_bytes(b"06/06/2021 20:30 (UTC-5)")
    cut = datetime(2021, 6, 6, 20, 40, 12, tzinfo=UTC_5)
    error = rejection(check_csv, "res/GOB.csv", head, cut, reason=STAMP_MISMATCH)
    assert (
        error.detail
        == "res/GOB.csv: stamp 06/06/2021 20:30 (UTC-5) is not cut_time 2021-06-06T20:40-05:00"
    )


@pytest.mark.parametrize(
    "line2",
    [
        STAMP,
        b'"06/06/2021 22:40 (UTC-5)"',
        b'  "  06/06/2021 22:40 (UTC-5) " \t',
        b"06/06/2021 22:40 (UTC-05:00)",
        b"06/06/2021 22:40 (UTC-05)",
        b"06/06/2021 22:40 (UTC-5:00)",
        b"06/06/2021  22:40(UTC-5)",
        b"07/06/2021 03:40 (UTC+0)",
        b"07/06/2021 09:10 (UTC+05:30)",
    ],
)
def test_stamp_forms_denote_the_cut(line2: bytes) -> None:
    assert parse_csv_stamp(csv_bytes(line2)) == CUT
    check_csv("a.csv", csv_bytes(line2), CUT)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_line_endings(newline: bytes) -> None:
    head = b"\xef\xbb\xbf" + csv_bytes(STAMP, newline)
    assert parse_csv_stamp(head) == CUT


def test_cut_time_in_another_offset_matches_the_same_instant() -> None:
    head = csv_bytes(STAMP)
    check_csv("a.csv", head, datetime(2021, 6, 7, 3, 40, 59, tzinfo=timezone.utc))
    check_csv("a.csv", head, datetime(2021, 6, 7, 9, 10, tzinfo=timezone(timedelta(hours=5.5))))
    rejection(
        check_csv, "a.csv", head, datetime(2021, 6, 6, 22, 40, tzinfo=UTC_7), reason=STAMP_MISMATCH
    )


def test_latin1_and_utf8_bytes_elsewhere_are_harmless() -> None:
    head = csv_bytes(STAMP, line1=b"ELECCI\xd3N DE DIPUTACI\xd3N|A\xd1O") + b"\xe9\xff" * 100
    assert parse_csv_stamp(head) == CUT
    head = csv_bytes(STAMP, line1="ELECCIÓN".encode())
    assert parse_csv_stamp(head) == CUT


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"GUBERNATURA",
        b"GUBERNATURA\n",
        csv_bytes(b"ACTAS_ESPERADAS,ACTAS_REGISTRADAS"),
        csv_bytes(b"06/06/2021 22:40"),
        csv_bytes(b"06/06/2021 22:40 (UTC-5),,,"),
        csv_bytes(b"6/6/2021 22:40 (UTC-5)"),
        csv_bytes(b"06/06/2021 22:40 (UTC\xe2\x88\x925)"),
        csv_bytes(b"06/06/2021 22:40 (GMT-5)"),
        STAMP + b"\nGUBERNATURA\n",
    ],
)
def test_line_2_that_is_no_stamp_is_not_checked(head: bytes) -> None:
    assert parse_csv_stamp(head) is None
    check_csv("a.csv", head, CUT + timedelta(days=3))


@pytest.mark.parametrize(
    "line2",
    [
        b"32/13/2021 22:40 (UTC-5)",
        b"29/02/2021 22:40 (UTC-5)",
        b"06/06/2021 24:00 (UTC-5)",
        b"06/06/2021 22:60 (UTC-5)",
        b"06/06/2021 22:40 (UTC-24)",
        b"06/06/2021 22:40 (UTC-05:60)",
    ],
)
def test_stamp_shaped_but_invalid_is_a_mismatch(line2: bytes) -> None:
    with pytest.raises(InvalidStampError):
        parse_csv_stamp(csv_bytes(line2))
    error = rejection(check_csv, "a.csv", csv_bytes(line2), CUT, reason=STAMP_MISMATCH)
    assert "not a valid date and time" in error.detail


def test_naive_cut_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check_csv("a.csv", csv_bytes(STAMP), datetime(2021, 6, 6, 22, 40))


def test_control_characters_in_paths_stay_on_one_line() -> None:
    error = rejection(
        check_csv, "a\nb.csv", csv_bytes(STAMP), CUT + timedelta(hours=1), reason=STAMP_MISMATCH
    )
    assert error.detail.startswith("a\\nb.csv: ")


# --- zip names -----------------------------------------------------------------------------


def test_zip_name_stamp() -> None:
    expected = datetime(2021, 6, 1, 18, 52, tzinfo=UTC_5)
    assert parse_zip_name_stamp("20210601_1852_PREP_GOB_CAMP.zip", UTC_5) == expected
    assert parse_zip_name_stamp("dir/sub/20210601_1852_prep.ZIP", UTC_5) == expected
    assert parse_zip_name_stamp(
        "20210601_1852_PREP_GOB_CAMP.zip", timezone.utc
    ) == expected + timedelta(hours=-5)
    for name in [
        "campeche-2021-20210601_1852_PREP_CAMP.zip",
        "20210601_1852_GOB.zip",
        "20210601_1852_PREP.csv",
        "2021.zip",
    ]:
        assert parse_zip_name_stamp(name, UTC_5) is None, name
    with pytest.raises(InvalidStampError):
        parse_zip_name_stamp("20211301_1852_PREP.zip", UTC_5)


# --- the real delivery zip -----------------------------------------------------------------


def test_real_zip_matches_its_cut() -> None:
    with CAMPECHE_ZIP.open("rb") as fileobj:
        check_zip(CAMPECHE_ZIP.name, fileobj, ZIP_CUT)
        check_zip(CAMPECHE_ZIP.name, fileobj, ZIP_CUT.replace(second=59))


def test_real_zip_one_minute_later_mismatches_on_an_inner_zip_name() -> None:
    with CAMPECHE_ZIP.open("rb") as fileobj:
        error = rejection(
            check_zip, "d.zip", fileobj, ZIP_CUT + timedelta(minutes=1), reason=STAMP_MISMATCH
        )
    assert error.detail == (
        "d.zip!20210601_1852_PREP_GOB_CAMP.zip: name stamp 20210601_1852 "
        "is not cut_time 2021-06-01T18:53-05:00"
    )


def test_real_zip_names_are_read_in_the_offset_of_cut_time() -> None:
    same_instant_in_utc = ZIP_CUT.astimezone(timezone.utc)
    with CAMPECHE_ZIP.open("rb") as fileobj:
        error = rejection(check_zip, "d.zip", fileobj, same_instant_in_utc, reason=STAMP_MISMATCH)
    assert "name stamp 20210601_1852 is not cut_time 2021-06-01T23:52+00:00" in error.detail


def test_real_zip_csv_stamps_are_checked_inside_inner_zips() -> None:
    """Inner zips renamed without a stamp: the inner CSV stamps alone still decide."""
    with zipfile.ZipFile(CAMPECHE_ZIP) as real:
        inner = {f"x{n}.zip": real.read(info) for n, info in enumerate(real.infolist())}
    data = zip_bytes(inner, zipfile.ZIP_STORED)
    run_zip(data, ZIP_CUT)
    error = rejection(run_zip, data, ZIP_CUT + timedelta(minutes=1), reason=STAMP_MISMATCH)
    assert error.detail.startswith(
        "cut/delivery.zip!x0.zip!CAMP_GOB_2021.csv: stamp 01/06/2021 18:52 (UTC-5)"
    )


def test_real_zip_copied_under_a_stamped_name(tmp_path: Path) -> None:
    good = tmp_path / "20210601_1852_PREP_CAMP.zip"
    bad = tmp_path / "20210601_1853_PREP_CAMP.zip"
    shutil.copyfile(CAMPECHE_ZIP, good)
    shutil.copyfile(CAMPECHE_ZIP, bad)
    with good.open("rb") as fileobj:
        check_file(good.name, fileobj, ZIP_CUT)
    with bad.open("rb") as fileobj:
        error = rejection(check_file, bad.name, fileobj, ZIP_CUT, reason=STAMP_MISMATCH)
    assert error.detail.startswith("20210601_1853_PREP_CAMP.zip: name stamp 20210601_1853 is not")


def test_truncated_and_damaged_real_zip_is_invalid() -> None:
    data = CAMPECHE_ZIP.read_bytes()
    rejection(run_zip, data[: len(data) // 2], ZIP_CUT, reason=ZIP_INVALID)
    damaged = bytearray(data)
    damaged[1000:1100] = bytes(100)
    error = rejection(run_zip, bytes(damaged), ZIP_CUT, reason=ZIP_INVALID)
    assert error.detail.startswith(
        "cut/delivery.zip!20210601_1852_PREP_GOB_CAMP.zip: cannot be read"
    )


# --- nested zips built in memory -----------------------------------------------------------


def test_nested_csv_mismatch_names_the_whole_path() -> None:
    inner = zip_bytes({"LEEME.txt": b"x", "res/GOB.csv": csv_bytes(b"06/06/2021 22:30 (UTC-5)")})
    outer = zip_bytes({"20210606_2240_PREP_GOB.zip": inner})
    error = rejection(
        check_zip, "20210606_2240_PREP.zip", io.BytesIO(outer), CUT, reason=STAMP_MISMATCH
    )
    assert error.detail.startswith(
        "20210606_2240_PREP.zip!20210606_2240_PREP_GOB.zip!res/GOB.csv: stamp 06/06/2021 22:30"
    )


def test_nested_zip_name_mismatch() -> None:
    inner = zip_bytes({"GOB.csv": csv_bytes(STAMP)})
    run_zip(zip_bytes({"20210606_2240_PREP_GOB.zip": inner}))
    error = rejection(
        run_zip, zip_bytes({"dir/20210606_2230_PREP_GOB.zip": inner}), reason=STAMP_MISMATCH
    )
    assert "!dir/20210606_2230_PREP_GOB.zip: name stamp" in error.detail


def test_uppercase_extensions_and_other_members() -> None:
    inner = zip_bytes({"GOB.CSV": csv_bytes(b"06/06/2021 22:30 (UTC-5)")})
    rejection(run_zip, zip_bytes({"A.ZIP": inner}), reason=STAMP_MISMATCH)
    run_zip(zip_bytes({"notes.txt": csv_bytes(b"01/01/2000 00:00 (UTC-5)"), "dir/": b""}))


def nest(levels: int) -> bytes:
    """A zip ``levels`` zips deep inside the listed one, a stamped CSV at the bottom."""
    data = zip_bytes({"GOB.csv": csv_bytes(STAMP)})
    for _ in range(levels):
        data = zip_bytes({"inner.zip": data})
    return data


def test_nesting_up_to_max_depth_is_read() -> None:
    run_zip(nest(3))
    rejection(run_zip, nest(3), CUT + timedelta(minutes=1), reason=STAMP_MISMATCH)
    run_zip(nest(1), limits=ZipLimits(max_depth=1))


def test_nesting_beyond_max_depth_is_invalid() -> None:
    error = rejection(run_zip, nest(4), reason=ZIP_INVALID)
    assert "nested 4 deep, over max_depth 3" in error.detail
    rejection(run_zip, nest(1), limits=ZipLimits(max_depth=0), reason=ZIP_INVALID)


# --- corrupt zips and limits ---------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"not a zip at all" * 100, b"PK\x05\x06" + bytes(10)])
def test_corrupt_zip_is_invalid(data: bytes) -> None:
    rejection(run_zip, data, reason=ZIP_INVALID)


def test_zip64_end_records_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
    data = zip_bytes({"a.txt": b"", "GOB.csv": csv_bytes(STAMP)})
    record = data.rindex(b"PK\x06\x06")
    run_zip(data)
    rejection(run_zip, data, CUT + timedelta(minutes=1), reason=STAMP_MISMATCH)
    lying = bytearray(data)
    struct.pack_into("<Q", lying, record + 32, 99)
    error = rejection(run_zip, bytes(lying), limits=ZipLimits(max_entries=50), reason=ZIP_INVALID)
    assert "99 entries, over max_entries 50" in error.detail


def test_corrupt_nested_zip_is_invalid() -> None:
    error = rejection(run_zip, zip_bytes({"inner.zip": b"PK\x03\x04 garbage"}), reason=ZIP_INVALID)
    assert error.detail.startswith("cut/delivery.zip!inner.zip: not a readable zip")


def test_too_many_entries() -> None:
    data = zip_bytes({f"f{n}.txt": b"" for n in range(11)})
    run_zip(data, limits=ZipLimits(max_entries=11))
    error = rejection(run_zip, data, limits=ZipLimits(max_entries=10), reason=ZIP_INVALID)
    assert "11 entries, over max_entries 10" in error.detail


def test_entry_count_that_lies_is_still_counted() -> None:
    data = bytearray(zip_bytes({f"f{n}.txt": b"" for n in range(11)}))
    eocd = data.rindex(b"PK\x05\x06")
    struct.pack_into("<HH", data, eocd + 8, 1, 1)
    assert len(zipfile.ZipFile(io.BytesIO(bytes(data))).infolist()) == 11
    rejection(run_zip, bytes(data), limits=ZipLimits(max_entries=10), reason=ZIP_INVALID)


def test_oversized_central_directory_is_refused_before_parsing() -> None:
    data = zip_bytes({"n" * 2000 + ".txt": b""})
    error = rejection(run_zip, data, limits=ZipLimits(max_entries=2), reason=ZIP_INVALID)
    assert "central directory of" in error.detail


def test_encrypted_member_is_invalid() -> None:
    data = zip_bytes({"GOB.csv": csv_bytes(STAMP)})
    encrypted = patch_central_entry(data, b"GOB.csv", 8, "<H", 0x1)
    error = rejection(run_zip, encrypted, reason=ZIP_INVALID)
    assert error.detail == "cut/delivery.zip!GOB.csv: encrypted"


def test_compression_without_bounded_reads_is_invalid() -> None:
    bzip2 = zip_bytes({"GOB.csv": csv_bytes(STAMP)}, zipfile.ZIP_BZIP2)
    error = rejection(run_zip, bzip2, reason=ZIP_INVALID)
    assert "compression method 12" in error.detail
    run_zip(zip_bytes({"LEEME.txt": b"unread"}, zipfile.ZIP_LZMA))


def test_declared_size_over_max_member_bytes() -> None:
    data = zip_bytes({"GOB.csv": csv_bytes(STAMP) + bytes(5000)})
    error = rejection(run_zip, data, limits=ZipLimits(max_member_bytes=4000), reason=ZIP_INVALID)
    assert "over max_member_bytes 4000" in error.detail


@pytest.fixture(scope="module")
def zeros_300mb() -> bytes:
    """300 MB of zeros, deflated as ``GOB.csv`` (and as a nested zip), streamed in memory."""
    buffer = io.BytesIO()
    head = csv_bytes(STAMP)
    with (
        zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("GOB.csv", "w") as member,
    ):
        member.write(head + bytes(1024**2 - len(head)))
        for _ in range(299):
            member.write(bytes(1024**2))
    return buffer.getvalue()


@pytest.mark.timeout(20)
def test_zip_bomb_is_refused_by_its_ratio(zeros_300mb: bytes) -> None:
    assert len(zeros_300mb) < 1024**2
    error = rejection(run_zip, zeros_300mb, reason=ZIP_INVALID)
    assert "over max_ratio 200" in error.detail
    nested = zip_bytes({"bomb.zip": zeros_300mb}, zipfile.ZIP_STORED)
    rejection(run_zip, nested, reason=ZIP_INVALID)


@pytest.mark.timeout(20)
def test_bomb_csv_is_read_only_as_far_as_its_stamp(zeros_300mb: bytes) -> None:
    lenient = ZipLimits(max_ratio=10**6, max_total_read=HEAD_BYTES)
    run_zip(zeros_300mb, limits=lenient)
    rejection(
        run_zip, zeros_300mb, CUT + timedelta(minutes=1), limits=lenient, reason=STAMP_MISMATCH
    )


@pytest.mark.timeout(20)
def test_bytes_actually_decompressed_are_bounded(zeros_300mb: bytes) -> None:
    as_zip = zeros_300mb.replace(b"GOB.csv", b"GOB.zip")
    lenient = ZipLimits(max_ratio=10**6, max_total_read=8 * 1024**2)
    error = rejection(run_zip, as_zip, limits=lenient, reason=ZIP_INVALID)
    assert error.detail == (
        "cut/delivery.zip!GOB.zip: decompresses beyond max_total_read 8388608 bytes in all"
    )


def test_budget_is_shared_by_all_members() -> None:
    inner = zip_bytes({"GOB.csv": csv_bytes(STAMP) + bytes(300_000)}, zipfile.ZIP_STORED)
    members = {f"x{n}.zip": inner for n in range(4)}
    data = zip_bytes(members, zipfile.ZIP_STORED)
    run_zip(data, limits=ZipLimits(max_total_read=4 * (len(inner) + HEAD_BYTES)))
    rejection(
        run_zip,
        data,
        limits=ZipLimits(max_total_read=3 * (len(inner) + HEAD_BYTES)),
        reason=ZIP_INVALID,
    )


@pytest.mark.timeout(20)
def test_member_whose_declared_size_lies_is_invalid(zeros_300mb: bytes) -> None:
    as_zip = zeros_300mb.replace(b"GOB.csv", b"GOB.zip")
    lying = patch_central_entry(as_zip, b"GOB.zip", 24, "<L", 100_000)
    info = zipfile.ZipFile(io.BytesIO(lying)).getinfo("GOB.zip")
    assert info.file_size == 100_000 and info.compress_size > 1000
    error = rejection(run_zip, lying, reason=ZIP_INVALID)
    assert "cannot be read" in error.detail


def test_member_whose_declared_size_lies_low_on_a_real_inner_zip() -> None:
    with zipfile.ZipFile(CAMPECHE_ZIP) as real:
        inner = real.read("20210601_1852_PREP_GOB_CAMP.zip")
    data = zip_bytes({"20210601_1852_PREP_GOB_CAMP.zip": inner})
    lying = patch_central_entry(data, b"20210601_1852_PREP_GOB_CAMP.zip", 24, "<L", len(inner) - 1)
    rejection(run_zip, lying, ZIP_CUT, reason=ZIP_INVALID)


# --- check_file dispatch -------------------------------------------------------------------


def test_check_file_dispatches_on_extension() -> None:
    bad = csv_bytes(b"06/06/2021 22:30 (UTC-5)")
    rejection(check_file, "a/GOB.CSV", io.BytesIO(bad), CUT, reason=STAMP_MISMATCH)
    rejection(
        check_file, "a/GOB.Zip", io.BytesIO(zip_bytes({"G.csv": bad})), CUT, reason=STAMP_MISMATCH
    )
    check_file("a/GOB.txt", io.BytesIO(bad), CUT)
    check_file("a/index.html", io.BytesIO(b"PK\x03\x04 not a zip"), CUT)


def test_check_file_reads_a_csv_from_its_start() -> None:
    fileobj = io.BytesIO(csv_bytes(b"06/06/2021 22:30 (UTC-5)"))
    fileobj.read()
    rejection(check_file, "GOB.csv", fileobj, CUT, reason=STAMP_MISMATCH)


def test_check_file_on_real_campeche_csv() -> None:
    csv = real_stamped_csvs()[0]
    with csv.open("rb") as fileobj:
        check_file(csv.name, fileobj, folder_time(csv))
        rejection(
            check_file,
            csv.name,
            fileobj,
            folder_time(csv) - timedelta(minutes=20),
            reason=STAMP_MISMATCH,
        )


def test_check_file_needs_line_2_within_head_bytes() -> None:
    late = b"x" * HEAD_BYTES + b"\n" + b"06/06/2021 22:30 (UTC-5)\n"
    # Not read, so not checked: a stamp that cannot be located is a mismatch.
    error = rejection(check_file, "GOB.csv", io.BytesIO(late), CUT, reason=STAMP_MISMATCH)
    assert "cannot be checked" in error.detail
    early = b"x" * (HEAD_BYTES - 100) + b"\n" + b"06/06/2021 22:30 (UTC-5)\n"
    rejection(check_file, "GOB.csv", io.BytesIO(early), CUT, reason=STAMP_MISMATCH)
