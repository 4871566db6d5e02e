"""``prep-agent verify`` and ``prep-agent run --once`` judge a delivery alike.

For every rejection case of tests/test_rejections.py, and for the cases where
the signature or the manifest itself is missing, unreadable or too large, the
drop folder is prepared once, copied, and each copy is judged by one command:
both must exit 3 and print the same reason (and the same detail).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prep_agent import cli
from prep_agent.core.verify import MAX_SIGNATURE_BYTES
from tests.kit import Institute, make_config
from tests.test_rejections import CASES, GOOD_TIME, Case

SMALL = {"max_files": 4, "max_file_bytes": 200_000}
"""The limits of the agent in tests/test_rejections.py."""


@dataclass(frozen=True)
class Scenario:
    """A bad delivery, the reason both commands must give, and the agent's setup."""

    deliver: Case
    reason: str
    settings: dict[str, Any] = field(default_factory=lambda: dict(SMALL))
    publish_first: bool = True


def without(name: str) -> Case:
    """A complete valid cut of sequence 3, then ``name`` removed from the drop folder."""

    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        inst.cut(inbox, 3)
        (inbox / name).unlink()

    return deliver


def replaced_by(name: str, kind: str) -> Case:
    """A complete valid cut of sequence 3 whose ``name`` is then replaced by ``kind``."""

    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        inst.cut(inbox, 3)
        target = inbox / name
        data = target.read_bytes()
        target.unlink()
        if kind == "fifo":
            os.mkfifo(target)
        elif kind == "symlink":
            (tmp / name).write_bytes(data)
            target.symlink_to(tmp / name)
        else:
            target.mkdir()

    return deliver


def first_cut(inst: Institute, inbox: Path, tmp: Path) -> None:
    inst.cut(inbox, 1)


def huge_signature(inst: Institute, inbox: Path, tmp: Path) -> None:
    inst.cut(inbox, 3)
    with (inbox / "prep-manifest.json.sig").open("ab") as fh:
        fh.write(b"\n" * MAX_SIGNATURE_BYTES)


SCENARIOS: dict[str, Scenario] = {
    **{name: Scenario(case, reason) for name, (case, reason) in CASES.items()},
    # test_rejections.test_oversized_manifest
    "oversized manifest": Scenario(
        first_cut,
        "limit-exceeded",
        {"max_manifest_bytes": 300},
        publish_first=False,
    ),
    # The signature arrived, the manifest it signs did not (prep-cut-v1 §1.2, §4.5).
    "signature without manifest": Scenario(without("prep-manifest.json"), "incomplete"),
    "signature is a FIFO": Scenario(replaced_by("prep-manifest.json.sig", "fifo"), "file-type"),
    "signature is a symlink": Scenario(
        replaced_by("prep-manifest.json.sig", "symlink"), "file-type"
    ),
    "signature is a directory": Scenario(replaced_by("prep-manifest.json.sig", "dir"), "file-type"),
    "signature too large": Scenario(huge_signature, "limit-exceeded"),
    "manifest is a FIFO": Scenario(replaced_by("prep-manifest.json", "fifo"), "file-type"),
    "manifest is a symlink": Scenario(replaced_by("prep-manifest.json", "symlink"), "file-type"),
}


def copy_entry(src: str, dst: str) -> None:
    """``copy2``, except that a FIFO is made anew (opening it would block)."""
    if stat.S_ISFIFO(os.lstat(src).st_mode):
        os.mkfifo(dst)
    else:
        shutil.copy2(src, dst)


def copy_setup(src: Path, dst: Path) -> None:
    """Copy an agent's whole setup (config, root, drop folder, trust) to ``dst``."""
    shutil.copytree(src, dst, symlinks=True, copy_function=copy_entry)
    conf = dst / "prep-agent.conf"
    conf.write_text(conf.read_text().replace(str(src), str(dst)))


def judge(argv: list[str], setup: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Run one command; return its exit status and the one line it printed, with
    the ``setup`` folder and clock readings (the verification time) masked."""
    status = cli.main([*argv, "--config", str(setup / "prep-agent.conf")])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    line = lines[0].replace(str(setup), "SETUP")
    return status, re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "TIME", line)


def reason_of(line: str) -> str:
    """The reason class of a ``rejected: REASON: DETAIL`` line (else the whole line)."""
    status, _, rest = line.partition(": ")
    return rest.partition(": ")[0] if status == "rejected" else line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_verify_and_run_give_the_same_reason(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scenario = SCENARIOS[name]
    setup = tmp_path / "setup"
    inst = Institute(setup / "inst")
    config = make_config(setup, inst, **scenario.settings)
    if scenario.publish_first:
        files = inst.files(GOOD_TIME, 2)
        inst.deliver(config.inbox, files, inst.manifest(files, 2, GOOD_TIME))
        assert judge(["run", "--once"], setup, capsys)[0] == 0
    scratch = setup / "scratch"
    scratch.mkdir()
    scenario.deliver(inst, config.inbox, scratch)
    copy_setup(setup, tmp_path / "verify")
    copy_setup(setup, tmp_path / "run")

    verified = judge(["verify"], tmp_path / "verify", capsys)
    ran = judge(["run", "--once"], tmp_path / "run", capsys)

    assert (verified[0], reason_of(verified[1])) == (ran[0], reason_of(ran[1])), (verified, ran)
    assert (ran[0], reason_of(ran[1])) == (3, scenario.reason), ran
    assert verified[1] == ran[1], "same reason, different detail"
