"""A CSV stamp that cannot be located within HEAD_BYTES is a mismatch (spec §4.7).

Line 2 of a listed CSV must end within the first :data:`HEAD_BYTES` bytes; a
file whose line 1 (or line 2) runs past them would otherwise pass unchecked,
whatever its stamp says.
"""

from __future__ import annotations

import io
import zipfile
from datetime import timedelta, timezone
from pathlib import Path
from typing import Callable

import pytest

from prep_agent.agent.journal import read_journal
from prep_agent.core.errors import STAMP_MISMATCH, Rejection
from prep_agent.core.stamps import HEAD_BYTES, check_csv, check_file, check_zip
from prep_agent.daemon import Agent
from tests.kit import Institute, csv_bytes, make_config, minute_ago

CUT = minute_ago(20)
"""The cut of the tests (UTC-6, as the kit's CSV stamps)."""
RIGHT = CUT.strftime("%d/%m/%Y %H:%M").encode() + b" (UTC-6)"
WRONG = (CUT - timedelta(minutes=10)).strftime("%d/%m/%Y %H:%M").encode() + b" (UTC-6)"


def long_line_1(stamp: bytes, size: int = 5 * 1024) -> bytes:
    """A CSV whose line 1 is ``size`` bytes long and whose line 2 is ``stamp``."""
    return b"G" * size + b"\r\n" + stamp + b"\r\nA,B\r\n1,2\r\n"


def mismatch(call: Callable[..., object], *args: object) -> str:
    """The detail of the STAMP_MISMATCH that ``call(*args)`` raises."""
    with pytest.raises(Rejection) as caught:
        call(*args)
    assert caught.value.reason == STAMP_MISMATCH, caught.value
    assert "\n" not in str(caught.value)
    return caught.value.detail


@pytest.mark.core
@pytest.mark.parametrize("stamp", [WRONG, RIGHT], ids=["wrong stamp", "right stamp"])
def test_line_1_longer_than_head_bytes_is_a_mismatch(stamp: bytes) -> None:
    data = long_line_1(stamp)
    detail = mismatch(check_file, "datos/GOB.csv", io.BytesIO(data), CUT)
    assert detail == (
        f"datos/GOB.csv: line 2 does not end within the first {HEAD_BYTES} bytes, "
        "so its cut stamp cannot be checked"
    )
    mismatch(check_csv, "GOB.csv", data[:HEAD_BYTES], CUT)


@pytest.mark.core
def test_line_2_cut_off_by_head_bytes_is_a_mismatch() -> None:
    # Line 2 starts within the head but ends after it: "06/06/2021 22:4" is read.
    data = b"G" * (HEAD_BYTES - 10) + b"\n" + RIGHT + b"\n"
    assert mismatch(check_file, "GOB.csv", io.BytesIO(data), CUT).startswith("GOB.csv: line 2")


@pytest.mark.core
def test_csv_in_zip_with_long_line_1_is_a_mismatch() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("GOB.csv", long_line_1(WRONG))
    detail = mismatch(check_zip, "entrega.zip", io.BytesIO(buffer.getvalue()), CUT)
    assert detail.startswith("entrega.zip!GOB.csv: line 2 does not end within")


@pytest.mark.core
def test_short_complete_files_still_pass_or_fail_by_their_stamp() -> None:
    check_file("a.csv", io.BytesIO(b"GUBERNATURA\n"), CUT)  # no line 2: no stamp
    check_file("a.csv", io.BytesIO(b"GUBERNATURA\n" + RIGHT), CUT)  # last line, no newline
    check_file("a.csv", io.BytesIO(b"G" * 4000 + b"\n" + RIGHT + b"\n"), CUT)
    check_file("a.csv", io.BytesIO(csv_bytes(CUT) + b"9" * 100_000), CUT)
    mismatch(check_file, "a.csv", io.BytesIO(b"GUBERNATURA\n" + WRONG), CUT)
    utc = CUT.astimezone(timezone.utc)
    check_file("a.csv", io.BytesIO(b"G" * 100 + b"\n" + RIGHT + b"\n" + b"x" * 9000), utc)


@pytest.fixture
def agent(tmp_path: Path, request: pytest.FixtureRequest) -> Agent:
    inst = Institute(tmp_path / "inst")
    config = make_config(tmp_path, inst, stamp_check=request.param)
    files = inst.files(CUT, 1)
    files["datos/GOB.csv"] = long_line_1(RIGHT)
    inst.deliver(config.inbox, files, inst.manifest(files, 1, CUT))
    return Agent(config)


@pytest.mark.parametrize("agent", ["reject"], indirect=True)
def test_agent_rejects_a_cut_whose_csv_stamp_cannot_be_located(agent: Agent) -> None:
    outcome = agent.step(settle=False)
    assert outcome.status == "rejected", outcome
    assert outcome.rejection is not None
    assert outcome.rejection.reason == "stamp-mismatch"
    assert "datos/GOB.csv: line 2 does not end within" in outcome.rejection.detail


@pytest.mark.parametrize("agent", ["warn"], indirect=True)
def test_agent_in_warn_mode_publishes_and_journals_it(agent: Agent) -> None:
    assert agent.step(settle=False).status == "published"
    warnings = [e for e in read_journal(agent.config.journal_file) if e["event"] == "stamp-warning"]
    assert len(warnings) == 1 and "cannot be checked" in warnings[0]["detail"]
