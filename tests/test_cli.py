"""The command line: in-process through ``main(argv)`` and as the installed command."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from prep_agent import cli
from tests.kit import ELECTION, PREP_AGENT, Institute, make_config, minute_ago, ssh_sign, ssh_verify

COMMANDS = (
    "init",
    "run",
    "verify",
    "status",
    "rollback",
    "reset-sequence",
    "sign",
    "simulate",
    "demo",
    "report",
    "keygen",
    "collector",
)


@pytest.fixture
def inst(tmp_path: Path) -> Institute:
    return Institute(tmp_path / "inst")


def conf(tmp_path: Path) -> str:
    return str(tmp_path / "prep-agent.conf")


def status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert cli.main(["status", "--json", "--config", conf(tmp_path)]) == 0
    doc: dict[str, object] = json.loads(capsys.readouterr().out)
    return doc


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command: str) -> None:
    proc = subprocess.run([PREP_AGENT, command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: prep-agent {command}" in proc.stdout


def test_init_writes_config_and_layout(tmp_path: Path, inst: Institute) -> None:
    root = tmp_path / "srv"
    argv = [
        "init",
        "--root",
        str(root),
        "--election",
        ELECTION,
        "--trust",
        str(inst.allowed_signers),
    ]
    assert cli.main(argv) == 0
    text = (root / "prep-agent.conf").read_text()
    assert f"election = {ELECTION}" in text and "# " in text
    assert (root / "inbox").is_dir() and (root / "releases").is_dir()
    assert cli.main(argv) == 2  # refuses to overwrite


@pytest.mark.core
def test_init_refuses_missing_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["init", "--root", str(tmp_path), "--election", ELECTION, "--trust", "/nonexistent"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err


def test_run_once_verify_status(
    tmp_path: Path, inst: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    make_config(tmp_path, inst)
    assert status(tmp_path, capsys)["state"] == "no-cut"
    inst.cut(tmp_path / "inbox", 1, cut_time=minute_ago(5))
    assert cli.main(["verify", "--config", conf(tmp_path)]) == 0
    assert "accepted: sequence 1" in capsys.readouterr().out
    assert cli.main(["run", "--once", "--config", conf(tmp_path)]) == 0
    doc = status(tmp_path, capsys)
    assert doc["sequence"] == 1
    assert doc["state"] == "current"
    assert doc["last_rejection"] is None
    assert doc["current_path"] == os.path.realpath(tmp_path / "root" / "current")
    manifest = (tmp_path / "root/current/.well-known/prep-cut/manifest.json").read_bytes()
    assert doc["manifest_sha256"] == __import__("hashlib").sha256(manifest).hexdigest()


def test_verify_reports_rejection_without_publishing(
    tmp_path: Path, inst: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    make_config(tmp_path, inst)
    when = minute_ago(10)
    files = inst.files(when, 1)
    inst.deliver(tmp_path / "inbox", files, inst.manifest(files, 1, when, election="otra-2021"))
    assert cli.main(["verify", "--config", conf(tmp_path)]) == 3
    assert "rejected: wrong-election" in capsys.readouterr().out
    assert not (tmp_path / "root" / "current").exists()
    assert cli.main(["run", "--once", "--config", conf(tmp_path)]) == 3
    assert status(tmp_path, capsys)["last_rejection"]["reason"] == "wrong-election"  # type: ignore[index]


def test_rollback_and_reset_sequence(
    tmp_path: Path, inst: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    make_config(tmp_path, inst)
    inbox = tmp_path / "inbox"
    for seq in (1, 2, 3):
        inst.cut(inbox, seq)
        assert cli.main(["run", "--once", "--config", conf(tmp_path)]) == 0
    assert cli.main(["rollback", "--config", conf(tmp_path)]) == 0
    assert status(tmp_path, capsys)["sequence"] == 2
    assert cli.main(["rollback", "--config", conf(tmp_path), "--to", "1"]) == 0
    doc = status(tmp_path, capsys)
    assert doc["sequence"] == 1 and doc["highest_sequence"] == 3
    # Rollback protection still holds: sequence 3 cannot come back by replay of 2.
    inst.cut(inbox, 2)
    assert cli.main(["run", "--once", "--config", conf(tmp_path)]) == 3
    # Lowering below what is published is refused; lowering to it is allowed and logged.
    assert cli.main(["reset-sequence", "--config", conf(tmp_path), "--to", "0"]) == 2
    assert cli.main(["reset-sequence", "--config", conf(tmp_path), "--to", "1"]) == 0
    inst.cut(inbox, 2, cut_time=minute_ago(5))
    assert cli.main(["run", "--once", "--config", conf(tmp_path)]) == 0
    assert status(tmp_path, capsys)["sequence"] == 2
    events = [
        json.loads(x)["event"] for x in (tmp_path / "root/journal.jsonl").read_text().splitlines()
    ]
    assert events.count("operator-rollback") == 2 and "operator-reset-sequence" in events


def test_sign_output_verifies_with_ssh_keygen(tmp_path: Path, inst: Institute) -> None:
    pub = tmp_path / "pub"
    (pub / "datos").mkdir(parents=True)
    (pub / "index.html").write_text("<h1>PREP</h1>")
    (pub / "datos" / "a.txt").write_text("x")
    cut_time = minute_ago(3).isoformat()
    argv = [
        "sign",
        "--key",
        str(inst.key),
        "--election",
        ELECTION,
        "--sequence",
        "7",
        "--cut-time",
        cut_time,
        "--final",
        "--notice-level",
        "info",
        "--notice-text",
        "Cierre del PREP",
        str(pub),
    ]
    assert cli.main(argv) == 0
    data = (pub / "prep-manifest.json").read_bytes()
    doc = json.loads(data)
    assert doc["sequence"] == 7 and doc["final"] is True and doc["entry"] == "index.html"
    assert doc["notice"] == {"level": "info", "text": "Cierre del PREP"}
    assert [f["path"] for f in doc["files"]] == ["datos/a.txt", "index.html"]
    ssh_verify(inst.allowed_signers, pub / "prep-manifest.json.sig", data)


def test_threshold_counts_distinct_keys(tmp_path: Path, inst: Institute) -> None:
    second = Institute(tmp_path / "second")
    with inst.allowed_signers.open() as fh:
        lines = fh.read()
    trust = tmp_path / "two_signers"
    trust.write_text(lines + second.allowed_signers.read_text())
    config = make_config(tmp_path, inst, threshold=2, trust=trust)
    when = minute_ago(10)
    files = inst.files(when, 1)
    data = json.dumps(inst.manifest(files, 1, when)).encode()
    twice = ssh_sign(inst.key, data) + ssh_sign(inst.key, data, hashalg="sha256")
    inst.deliver(config.inbox, files, raw=data, sig=twice)
    assert cli.main(["run", "--once", "--config", conf(tmp_path)]) == 3
    both = ssh_sign(inst.key, data) + ssh_sign(second.key, data)
    inst.deliver(config.inbox, files, raw=data, sig=both)
    assert cli.main(["run", "--once", "--config", conf(tmp_path)]) == 0


@pytest.mark.core
def test_unexpected_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--config", str(tmp_path / "missing.conf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prep-agent: cannot read config") and err.count("\n") == 1
