"""Tests of prep_agent.core.package and prepcsv: PREP packages as institutes publish them.

The real fixtures (Campeche 2021 delivery zip and cut series, Sonora CSVs) must
inspect cleanly; crafted packages must each be rejected for their own reason.
"""

from __future__ import annotations

import hashlib
import io
import random
import zipfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from prep_agent.core.errors import (
    EQUIVOCATION,
    FILE_TYPE,
    LIMIT_EXCEEDED,
    PACKAGE_INVALID,
    PATH_INVALID,
    ROLLBACK,
    STAMP_MISMATCH,
    ZIP_INVALID,
    Error,
    Rejection,
)
from prep_agent.core.package import (
    Order,
    PackageLimits,
    check_order,
    decide_order,
    election_of,
    inspect_package,
)
from prep_agent.core.prepcsv import read_prep_csv

pytestmark = pytest.mark.core

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "prep-real"
CUTS = REAL / "campeche-2021-cuts"
DELIVERY = REAL / "campeche-2021-20210601_1852_PREP_CAMP.zip"
SONORA = REAL / "sonora-2021"
UTC_5 = timezone(timedelta(hours=-5))
UTC_7 = timezone(timedelta(hours=-7))
CUT_STAMPS = (
    "20210606_2240",
    "20210606_2320",
    "20210606_2340",
    "20210607_1320",
    "20210607_1440",
    "20210607_2000",
)
"""The six cuts of the Campeche series."""


def zip_bytes(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip holding ``members`` (path → bytes) in order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for path, data in members.items():
            archive.writestr(zipfile.ZipInfo(path, (2021, 6, 6, 22, 40, 0)), data, method)
    return buffer.getvalue()


def cut_members(cut: str) -> dict[str, bytes]:
    """The real files of one Campeche cut, as folders ``<cut>_PREP_<ELEC>_CAMP/``."""
    members: dict[str, bytes] = {}
    for folder in sorted(CUTS.glob(f"{cut}_PREP_*_CAMP")):
        for file in sorted(folder.iterdir()):
            members[f"{folder.name}/{file.name}"] = file.read_bytes()
    return members


def cut_package(cut: str) -> tuple[str, bytes]:
    """The name and bytes of a package of one Campeche cut, one folder per election."""
    return f"{cut}_PREP_CAMP.zip", zip_bytes(cut_members(cut))


def with_line_2(data: bytes, line: bytes) -> bytes:
    """``data`` with its line 2 replaced by ``line``."""
    first, _, rest = data.partition(b"\n")
    return first + b"\n" + line + b"\n" + rest.partition(b"\n")[2]


def rejected(name: str, data: bytes, limits: PackageLimits | None = None) -> Rejection:
    """The rejection :func:`inspect_package` raises; fails the test if none."""
    with pytest.raises(Rejection) as caught:
        if limits is None:
            inspect_package(name, data)
        else:
            inspect_package(name, data, limits)
    assert isinstance(caught.value, Error)
    assert "\n" not in str(caught.value)
    return caught.value


# --- the real packages --------------------------------------------------------------


def test_the_real_delivery_zip_of_inner_zips_inspects_cleanly() -> None:
    data = DELIVERY.read_bytes()
    package = inspect_package("20210601_1852_PREP_CAMP.zip", data)
    assert package.stamp == datetime(2021, 6, 1, 18, 52, tzinfo=UTC_5)
    assert package.stamp.utcoffset() == timedelta(hours=-5)
    assert package.sequence == 202106011852
    assert package.sha256 == hashlib.sha256(data).hexdigest()
    assert package.warnings == ()
    assert sorted(e.code for e in package.elections) == ["AYUN", "DIP_LOC", "GUB", "JUNTAS"]
    with zipfile.ZipFile(DELIVERY) as outer:
        for inner_name in outer.namelist():
            inner_bytes = outer.read(inner_name)
            assert package.entries[inner_name] == inner_bytes
            with zipfile.ZipFile(io.BytesIO(inner_bytes)) as inner:
                for member in inner.namelist():
                    unpacked = f"{inner_name[: -len('.zip')]}/{member}"
                    assert package.entries[unpacked] == inner.read(member)
    assert len(package.entries) == 4 + 12


@pytest.mark.parametrize("cut", CUT_STAMPS)
def test_each_real_cut_of_the_series_inspects_with_its_stamp(cut: str) -> None:
    name, data = cut_package(cut)
    package = inspect_package(name, data)
    expected = datetime.strptime(cut, "%Y%m%d_%H%M").replace(tzinfo=UTC_5)
    assert package.stamp == expected and package.stamp.utcoffset() == timedelta(hours=-5)
    assert package.sequence == int(cut.replace("_", ""))
    assert sorted(e.code for e in package.elections) == ["AYUN", "DIP_LOC", "GUB", "JUNTAS"]
    assert dict(package.entries) == cut_members(cut)
    assert package.warnings == ()


def test_the_real_sonora_csvs_at_the_top_of_a_package_inspect_with_their_utc_7_stamp() -> None:
    members = {file.name: file.read_bytes() for file in sorted(SONORA.glob("*.csv"))}
    package = inspect_package("20210607_1319_PREP_SON.zip", zip_bytes(members))
    assert package.stamp == datetime(2021, 6, 7, 13, 19, tzinfo=UTC_7)
    assert package.sequence == 202106071319
    assert {e.path: e.code for e in package.elections} == {
        "SON_AYUN_2021.csv": "AYUN",
        "SON_DIP_LOC_2021.csv": "DIP_LOC",
        "SON_GOB_2021.csv": "GUB",
    }
    assert dict(package.entries) == members


def test_a_fixed_url_name_without_a_stamp_is_a_warning_and_the_csvs_give_the_stamp() -> None:
    package = inspect_package("latest.zip", DELIVERY.read_bytes())
    assert package.sequence == 202106011852
    assert package.warnings == ("latest.zip: no YYYYMMDD_HHMM_PREP stamp in the name",)


def test_election_names_are_recognised_as_institutes_write_them() -> None:
    assert election_of("20210606_2240_PREP_GOB_CAMP/CAMP_GOB_2021.csv") == "GUB"
    assert election_of("20240602_2000_PREP_GUB_CDMX/x.csv") == "GUB"
    assert election_of("20210606_2240_PREP_DIP_LOC_CAMP.zip") == "DIP_LOC"
    assert election_of("x/CAMP_AYUN_2021.csv") == "AYUN"
    assert election_of("20180702_0800_PREP/presidencia.csv") == "PRES"
    assert election_of("Diputaciones.csv") == "DIP_FED"
    assert election_of("LEEME.txt") is None


# --- crafted bad packages -----------------------------------------------------------


def small_cut() -> dict[str, bytes]:
    """The GOB election of the 22:40 cut: one folder with its one CSV."""
    folder = "20210606_2240_PREP_GOB_CAMP"
    return {f"{folder}/CAMP_GOB_2021.csv": (CUTS / folder / "CAMP_GOB_2021.csv").read_bytes()}


NAME = "20210606_2240_PREP_CAMP.zip"


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("../CAMP_GOB_2021.csv", "path traversal"),
        ("a/../../CAMP_GOB_2021.csv", "path traversal"),
        ("/etc/CAMP_GOB_2021.csv", "absolute path"),
        ("C:/CAMP_GOB_2021.csv", "absolute path"),
        ("a\\..\\CAMP_GOB_2021.csv", "backslash"),
        ("a//CAMP_GOB_2021.csv", "empty or '.'"),
    ],
)
def test_unsafe_paths_are_rejected(path: str, words: str) -> None:
    members = {**small_cut(), path: b"x"}
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == PATH_INVALID and words in error.detail


def test_a_symlink_member_is_rejected_by_its_external_attributes() -> None:
    buffer = io.BytesIO(zip_bytes(small_cut()))
    with zipfile.ZipFile(buffer, "a") as archive:
        link = zipfile.ZipInfo("passwd")
        link.create_system = 3
        link.external_attr = (0o120777 << 16) & 0xFFFFFFFF
        archive.writestr(link, b"/etc/passwd")
    error = rejected(NAME, buffer.getvalue())
    assert error.reason == FILE_TYPE and "passwd: a symbolic link" in error.detail


def test_a_zip_bomb_by_ratio_is_rejected() -> None:
    members = {**small_cut(), "relleno.txt": b"0" * (4 * 1024**2)}
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == ZIP_INVALID and "over ratio 100 (a zip bomb)" in error.detail


def test_a_header_understating_the_size_is_caught_while_reading() -> None:
    """The declared size passes the limits; the bytes read do not match it."""
    bomb = b"0" * (4 * 1024**2)
    data = bytearray(zip_bytes({**small_cut(), "relleno.txt": bomb}))
    real_size = len(bomb).to_bytes(4, "little")
    lie = (1000).to_bytes(4, "little")
    assert data.count(real_size) == 2  # the local header and the central directory
    error = rejected(NAME, bytes(data.replace(real_size, lie)))
    assert error.reason == ZIP_INVALID and "relleno.txt: cannot be read" in error.detail


def test_a_header_overstating_the_compressed_size_is_rejected() -> None:
    """A compressed size larger than the archive would hide a ratio over the limit."""
    data = bytearray(zip_bytes({**small_cut(), "relleno.txt": b"0" * (4 * 1024**2)}))
    at = data.rfind(b"PK\x01\x02")  # the last central directory entry: relleno.txt
    data[at + 20 : at + 24] = (0x7FFFFFFF).to_bytes(4, "little")
    error = rejected(NAME, bytes(data))
    assert error.reason == ZIP_INVALID and "more than the archive holds" in error.detail


def test_a_bomb_by_total_size_is_rejected_while_reading() -> None:
    noise = random.Random(15).randbytes(400_000)
    members = {**small_cut(), "a.bin": noise, "b.bin": noise, "c.bin": noise}
    limits = PackageLimits(max_total_bytes=1_000_000)
    error = rejected(NAME, zip_bytes(members), limits)
    assert error.reason == LIMIT_EXCEEDED
    assert "c.bin: decompresses beyond 1000000 bytes" in error.detail


def test_too_many_entries_are_rejected() -> None:
    members = {**small_cut(), **{f"extra/{n}.txt": b"x" for n in range(10)}}
    error = rejected(NAME, zip_bytes(members), PackageLimits(max_entries=10))
    assert error.reason == LIMIT_EXCEEDED and "over 10 entries" in error.detail


@pytest.mark.parametrize(
    ("first", "second"),
    [("LEEME.txt", "leeme.TXT"), ("Straße.txt", "STRASSE.txt"), ("dir", "DIR/x.txt")],
)
def test_names_equal_after_casefold_are_rejected(first: str, second: str) -> None:
    members = {**small_cut(), first: b"1", second: b"2"}
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == PATH_INVALID


def test_a_file_that_is_also_a_folder_is_rejected() -> None:
    members = {**small_cut(), "notas": b"1", "notas/a.txt": b"2"}
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == PATH_INVALID and "both a file and a folder" in error.detail


def test_an_inner_zip_unpacked_over_a_file_of_the_package_is_rejected() -> None:
    inner = zip_bytes({"LEEME.txt": b"interior"})
    members = {**small_cut(), "extra.zip": inner, "extra/LEEME.txt": b"exterior"}
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == PATH_INVALID and "extra/LEEME.txt: appears twice" in error.detail


def test_the_same_name_twice_in_one_zip_is_rejected() -> None:
    buffer = io.BytesIO(zip_bytes(small_cut()))
    with pytest.warns(UserWarning), zipfile.ZipFile(buffer, "a") as archive:
        archive.writestr("LEEME.txt", b"1")
        archive.writestr("LEEME.txt", b"2")
    error = rejected(NAME, buffer.getvalue())
    assert error.reason == PATH_INVALID and "LEEME.txt: appears twice" in error.detail


def test_zips_nested_twice_are_rejected() -> None:
    deepest = zip_bytes({"x.txt": b"x"})
    inner = zip_bytes({"deeper.zip": deepest})
    error = rejected(NAME, zip_bytes({**small_cut(), "inner.zip": inner}))
    assert error.reason == ZIP_INVALID and "one level only" in error.detail


def test_too_many_inner_zips_are_rejected() -> None:
    inners = {f"i{n}.zip": zip_bytes({"x.txt": b"x"}) for n in range(3)}
    error = rejected(NAME, zip_bytes({**small_cut(), **inners}), PackageLimits(max_nested_zips=2))
    assert error.reason == LIMIT_EXCEEDED and "over 2 inner zips" in error.detail


def test_a_corrupt_zip_and_an_encrypted_member_are_rejected() -> None:
    assert rejected(NAME, b"PK\x03\x04 not a zip").reason == ZIP_INVALID
    data = bytearray(zip_bytes(small_cut(), zipfile.ZIP_STORED))
    data[6] |= 1  # local header flag
    at = data.rfind(b"PK\x01\x02")
    data[at + 8] |= 1  # central directory flag
    error = rejected(NAME, bytes(data))
    assert error.reason == ZIP_INVALID and "encrypted" in error.detail


def test_stamps_of_two_cuts_mixed_in_one_package_are_rejected() -> None:
    members = {**cut_members("20210606_2240"), **cut_members("20210606_2320")}
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == STAMP_MISMATCH and "disagrees" in error.detail


def test_a_changed_stamp_in_one_csv_only_is_rejected() -> None:
    members = cut_members("20210606_2240")
    path = "20210606_2240_PREP_AYUN_CAMP/CAMP_AYUN_2021.csv"
    members[path] = with_line_2(members[path], b"06/06/2021 22:41 (UTC-5)")
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == STAMP_MISMATCH and path in str(error)


def test_a_changed_stamp_is_rejected_where_no_name_carries_one() -> None:
    """CSVs at the top of a package fetched as latest.zip: only they state the cut."""
    members = {file.name: file.read_bytes() for file in sorted(SONORA.glob("*.csv"))}
    members["SON_GOB_2021.csv"] = with_line_2(
        members["SON_GOB_2021.csv"], b'"07/06/2021 13:39 (UTC-7)"'
    )
    error = rejected("latest.zip", zip_bytes(members))
    assert error.reason == STAMP_MISMATCH
    assert error.detail.startswith("SON_GOB_2021.csv: stamp 2021-06-07T13:39-07:00 disagrees")


def test_a_changed_offset_in_one_csv_only_is_rejected() -> None:
    members = cut_members("20210606_2240")
    path = "20210606_2240_PREP_GOB_CAMP/CAMP_GOB_2021.csv"
    members[path] = with_line_2(members[path], b"06/06/2021 22:40 (UTC-6)")
    assert rejected(NAME, zip_bytes(members)).reason == STAMP_MISMATCH


def test_an_invalid_stamp_and_a_results_csv_without_stamp_are_rejected() -> None:
    members = cut_members("20210606_2240")
    path = "20210606_2240_PREP_GOB_CAMP/CAMP_GOB_2021.csv"
    members[path] = with_line_2(members[path], b"31/06/2021 22:40 (UTC-5)")
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == STAMP_MISMATCH and "not a valid date" in error.detail
    members[path] = with_line_2(members[path], b"GUBERNATURA")
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == STAMP_MISMATCH and "without a cut stamp" in error.detail


def test_a_package_name_with_another_stamp_is_rejected() -> None:
    name, data = cut_package("20210606_2240")
    error = rejected("20210606_2320_PREP_CAMP.zip", data)
    assert error.reason == STAMP_MISMATCH and "name stamp 20210606_2320" in error.detail


def test_a_folder_name_with_another_stamp_is_rejected() -> None:
    members = {
        path.replace("_PREP_GOB_", "_PREP_GOB_").replace(
            "20210606_2240_PREP_GOB", "20210606_2241_PREP_GOB"
        ): data
        for path, data in cut_members("20210606_2240").items()
    }
    error = rejected(NAME, zip_bytes(members))
    assert error.reason == STAMP_MISMATCH and "20210606_2241_PREP_GOB_CAMP" in error.detail


def test_a_package_without_results_is_rejected() -> None:
    error = rejected(NAME, zip_bytes({"LEEME.txt": b"nada"}))
    assert error.reason == PACKAGE_INVALID


# --- the order of cuts --------------------------------------------------------------


def test_the_order_decision_covers_newer_older_replay_and_equivocation() -> None:
    first = datetime(2021, 6, 6, 22, 40, tzinfo=UTC_5)
    later = first + timedelta(minutes=20)
    assert decide_order(None, first, "aa") is Order.NEWER
    assert decide_order((first, "aa"), later, "bb") is Order.NEWER
    assert decide_order((later, "bb"), first, "aa") is Order.ROLLBACK
    assert decide_order((first, "AA"), first, "aa") is Order.REPLAY
    assert decide_order((first, "aa"), first, "cc") is Order.EQUIVOCATION
    same_instant = first.astimezone(timezone.utc)
    assert decide_order((first, "aa"), same_instant, "aa") is Order.REPLAY
    with pytest.raises(ValueError):
        decide_order(None, first.replace(tzinfo=None), "aa")


def test_check_order_on_the_real_series() -> None:
    older = inspect_package(*cut_package("20210606_2240"))
    newer = inspect_package(*cut_package("20210606_2320"))
    assert check_order(None, older) is True
    assert check_order((older.stamp, older.sha256), newer) is True
    assert check_order((newer.stamp, newer.sha256), newer) is False
    with pytest.raises(Rejection) as caught:
        check_order((newer.stamp, newer.sha256), older)
    assert caught.value.reason == ROLLBACK
    members = cut_members("20210606_2320")
    members["LEEME.txt"] = b"otro"
    other = inspect_package("20210606_2320_PREP_CAMP.zip", zip_bytes(members))
    with pytest.raises(Rejection) as caught:
        check_order((newer.stamp, newer.sha256), other)
    assert caught.value.reason == EQUIVOCATION


# --- reading the CSVs ---------------------------------------------------------------


def test_pipes_and_latin_1_read_as_the_same_cells_as_commas_and_utf_8() -> None:
    original = (CUTS / "20210607_2000_PREP_GOB_CAMP" / "CAMP_GOB_2021.csv").read_bytes()
    assert b"|" not in original and b'"' not in original
    text = original.decode("ascii").replace("GUBERNATURA", "GUBERNATURA ÉLECCIÓN")
    variant = text.replace(",", "|").replace("\n", "\r\n").encode("latin-1")
    read, other = read_prep_csv(original), read_prep_csv(variant)
    assert (other.separator, other.encoding) == ("|", "latin-1")
    assert other.election == "GUBERNATURA ÉLECCIÓN"
    assert (other.stamp_text, other.summary) == (read.stamp_text, read.summary)
    assert (other.columns, other.rows) == (read.columns, read.rows)


def test_bom_blank_lines_and_sin_dato_are_read_and_noted() -> None:
    table = read_prep_csv((SONORA / "SON_DIP_LOC_2021.csv").read_bytes())
    assert table.election.startswith("DIPUTACIONES LOCALES")
    assert table.stamp_text == "07/06/2021 13:19 (UTC-7)"
    assert table.summary_value("ACTAS_FUERA_CATALOGO") == "31"
    assert any("Sin dato" in row for row in table.rows)
    assert table.warnings == ()
    data = (CUTS / "20210607_2000_PREP_AYUN_CAMP" / "CAMP_AYUN_2021.csv").read_bytes()
    head, _, rows = data.partition(b"CLAVE_CASILLA")
    blank = head + b"\n\n" + b"CLAVE_CASILLA" + rows.replace(b"\n04", b"\n\n04", 3)
    spaced = read_prep_csv(blank)
    assert spaced.rows == read_prep_csv(data).rows
    assert "3 blank lines in the acta table, skipped" in spaced.warnings
    commas = head + b"CLAVE_CASILLA" + rows.replace(b"\n04", b"\n,,, ,\n04", 2)
    assert read_prep_csv(commas).rows == spaced.rows


def test_counts_that_disagree_in_the_real_data_are_a_warning() -> None:
    table = read_prep_csv(
        (CUTS / "20210607_2000_PREP_DIP_LOC_CAMP" / "CAMP_DIP_LOC_2021.csv").read_bytes()
    )
    assert table.warnings == (
        "summary: 1099 actas registered but 1100 captured + 3 out of catalogue",
    )
    package = inspect_package(*cut_package("20210607_2000"))
    assert package.stamp == datetime(2021, 6, 7, 20, 0, tzinfo=UTC_5)


def test_broken_csvs_give_warnings_never_exceptions() -> None:
    data = (CUTS / "20210606_2240_PREP_GOB_CAMP" / "CAMP_GOB_2021.csv").read_bytes()
    rng = random.Random(15)
    samples = [b"", b"\xff\xfe", b'"\n"\n"', data[:700], data.replace(b",", b",,", 40)]
    samples += [bytes(rng.randrange(256) for _ in range(300)) for _ in range(50)]
    for sample in samples:
        table = read_prep_csv(sample)
        assert isinstance(table.warnings, tuple)
    lines = data.split(b"\n")
    lines[3] = lines[3].rpartition(b",")[0]
    lines[7] = lines[7] + b",extra"
    short = read_prep_csv(b"\n".join(lines))
    assert short.warnings[:2] == (
        "line 4: 12 summary values for 13 headers",
        "line 8: 48 cells for 47 columns",
    )
    assert len(short.rows) == len(read_prep_csv(data).rows)
    assert all(len(row) == len(short.columns) for row in short.rows)
