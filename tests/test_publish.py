"""Publication (prep-cut-v1 §5): layout, reuse by hash, retention, state, settling."""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from prep_agent import cli
from prep_agent.agent.intake import open_in_inbox
from prep_agent.agent.lock import LockFile
from prep_agent.core.errors import LockError, Rejection
from prep_agent.daemon import Agent
from tests.kit import AgentDaemon, Institute, make_config, minute_ago, ssh_verify, tree_digest


@pytest.fixture
def inst(tmp_path: Path) -> Institute:
    return Institute(tmp_path / "inst")


def test_publishes_exact_bytes_and_signed_manifest(tmp_path: Path, inst: Institute) -> None:
    config = make_config(tmp_path, inst)
    agent = Agent(config)
    data = inst.cut(config.inbox, 1)
    assert agent.step().status == "published"

    assert os.readlink(config.current).startswith("releases/")  # relative symlink
    served = config.current
    files = inst.files(minute_ago(59), 1)
    for rel, body in files.items():
        assert (served / rel).read_bytes() == body
    well_known = served / ".well-known/prep-cut"
    assert (well_known / "manifest.json").read_bytes() == data
    sig = (well_known / "manifest.json.sig").read_bytes()
    assert sig == (config.inbox / "prep-manifest.json.sig").read_bytes()
    # Anyone can check the publication with the real ssh-keygen.
    ssh_verify(inst.allowed_signers, well_known / "manifest.json.sig", data)
    for path in Path(os.path.realpath(served)).rglob("*"):
        mode = path.stat().st_mode
        assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), path


def test_unchanged_files_are_reused_not_copied(tmp_path: Path, inst: Institute) -> None:
    config = make_config(tmp_path, inst)
    agent = Agent(config)
    inst.cut(config.inbox, 1)
    agent.step()
    first = Path(os.path.realpath(config.current))
    # Delta upload: only the changed files; the logo stays from cut 1.
    when = minute_ago(50)
    files = inst.files(when, 2)
    logo = files.pop("img/logo.svg")
    (config.inbox / "img/logo.svg").unlink()  # gone from the drop folder, still listed
    doc = inst.manifest({**files, "img/logo.svg": logo}, 2, when)
    inst.deliver(config.inbox, files, doc)
    assert agent.step().status == "published"
    second = Path(os.path.realpath(config.current))
    assert second != first
    assert (second / "img/logo.svg").stat().st_ino == (first / "img/logo.svg").stat().st_ino
    event = json.loads(config.journal_file.read_text().splitlines()[-1])
    assert event["event"] == "cut-published"
    assert event["bytes_copied"] == event["bytes"] - len(logo)


def test_retention_keeps_last_releases_and_state(tmp_path: Path, inst: Institute) -> None:
    config = make_config(tmp_path, inst, keep_releases=3, keep_replaced_seconds=0)
    agent = Agent(config)
    for seq in range(1, 7):
        inst.cut(config.inbox, seq)
        assert agent.step().status == "published"
    names = sorted(os.listdir(config.releases))
    assert len(names) == 3
    assert os.readlink(config.current) == f"releases/{names[-1]}"
    state = json.loads(config.state_file.read_text())
    assert state["highest_sequence"] == 6


def test_crash_between_swap_and_state_is_reconciled(tmp_path: Path, inst: Institute) -> None:
    config = make_config(tmp_path, inst)
    agent = Agent(config)
    inst.cut(config.inbox, 1)
    agent.step()
    inst.cut(config.inbox, 2)
    agent.step()
    # Simulate a crash that lost the state write after the swap to sequence 2.
    state = json.loads(config.state_file.read_text())
    state.update(highest_sequence=1, highest_manifest_sha256=None)
    config.state_file.write_text(json.dumps(state))
    restarted = Agent(config)
    assert restarted.state.highest_sequence == 2


def test_settling_waits_for_files_then_publishes(tmp_path: Path, inst: Institute) -> None:
    config = make_config(tmp_path, inst, settle_timeout=30)
    agent = Agent(config)
    when = minute_ago(10)
    files = inst.files(when, 1)
    page = files.pop("index.html")
    inst.deliver(config.inbox, files, inst.manifest({**files, "index.html": page}, 1, when))
    outcome = agent.step()
    assert outcome.status == "waiting" and outcome.rejection is not None
    assert outcome.rejection.reason == "incomplete"
    (config.inbox / "index.html").write_bytes(page)
    assert agent.step().status == "published"


def test_settle_timeout_rejects_incomplete(tmp_path: Path, inst: Institute) -> None:
    config = make_config(tmp_path, inst, settle_timeout=0.3)
    agent = Agent(config)
    when = minute_ago(10)
    files = inst.files(when, 1)
    page = files.pop("index.html")
    inst.deliver(config.inbox, files, inst.manifest({**files, "index.html": page}, 1, when))
    assert agent.step().status == "waiting"
    time.sleep(0.35)
    outcome = agent.step()
    assert outcome.status == "rejected" and outcome.rejection is not None
    assert outcome.rejection.reason == "incomplete"


def test_newer_signature_supersedes_settling_cut(tmp_path: Path, inst: Institute) -> None:
    config = make_config(tmp_path, inst, settle_timeout=30)
    agent = Agent(config)
    when = minute_ago(10)
    files = inst.files(when, 1)
    page = files.pop("index.html")
    inst.deliver(config.inbox, files, inst.manifest({**files, "index.html": page}, 1, when))
    assert agent.step().status == "waiting"
    inst.cut(config.inbox, 2)
    outcome = agent.step()
    assert (outcome.status, outcome.sequence) == ("published", 2)
    events = [json.loads(line)["event"] for line in config.journal_file.read_text().splitlines()]
    assert "cut-superseded" in events


def test_one_agent_per_root(tmp_path: Path, inst: Institute) -> None:
    config = make_config(tmp_path, inst)
    daemon = AgentDaemon(
        tmp_path / "prep-agent.conf", command=[sys.executable, "-m", "prep_agent.cli"]
    )
    try:
        daemon.start(timeout=10)
        with pytest.raises(LockError):
            LockFile(config.lock_file).acquire()
        assert cli.main(["run", "--once", "--config", str(tmp_path / "prep-agent.conf")]) == 4
    finally:
        code = daemon.stop()
    assert code == 0, daemon.output()
    events = [json.loads(line)["event"] for line in config.journal_file.read_text().splitlines()]
    assert events == ["server-listening", "agent-started", "agent-stopped"]


def test_published_tree_identical_to_upload_after_many_cuts(
    tmp_path: Path, inst: Institute
) -> None:
    config = make_config(tmp_path, inst)
    agent = Agent(config)
    for seq in (1, 2, 3):
        inst.cut(config.inbox, seq)
        agent.step()
    digest = tree_digest(config.current)
    expected = inst.files(minute_ago(57), 3)
    assert {k: v for k, v in digest.items() if not k.startswith(".well-known")} == {
        k: __import__("hashlib").sha256(v).hexdigest() for k, v in expected.items()
    }


@pytest.mark.timeout(5)
@pytest.mark.parametrize("kind", ["fifo", "symlink", "dirlink", "missing"])
@pytest.mark.core
def test_open_in_inbox_never_follows_or_blocks(tmp_path: Path, kind: str) -> None:
    """The open itself is safe, not only the stat pre-check (a file can change in between)."""
    inbox = tmp_path / "inbox"
    (inbox / "d").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f").write_text("secret")
    if kind == "fifo":
        os.mkfifo(inbox / "d" / "f")
    elif kind == "symlink":
        (inbox / "d" / "f").symlink_to(tmp_path / "outside" / "f")
    elif kind == "dirlink":
        (inbox / "d").rmdir()
        (inbox / "d").symlink_to(tmp_path / "outside")
    expected = "incomplete" if kind == "missing" else "file-type"
    with pytest.raises(Rejection) as caught:
        open_in_inbox(inbox, "d/f")
    assert caught.value.reason == expected


def test_allowed_signers_reloaded_on_change(tmp_path: Path, inst: Institute) -> None:
    """Key rotation without restart; a broken file keeps the previous trust."""
    config = make_config(tmp_path, inst)
    agent = Agent(config)
    new = Institute(tmp_path / "new")
    when = minute_ago(10)
    files = inst.files(when, 1)
    new.deliver(config.inbox, files, inst.manifest(files, 1, when))
    outcome = agent.step(settle=False)
    assert outcome.rejection is not None and outcome.rejection.reason == "signature-untrusted"

    original = inst.allowed_signers.read_text()
    inst.allowed_signers.write_text(original + new.allowed_signers.read_text())
    new.cut(config.inbox, 2, cut_time=minute_ago(9))
    assert agent.step(settle=False).status == "published"

    inst.allowed_signers.write_text(original + "this is not a key line\n")
    inst.cut(config.inbox, 3, cut_time=minute_ago(8))
    assert agent.step(settle=False).status == "published"
    events = [json.loads(line)["event"] for line in config.journal_file.read_text().splitlines()]
    assert events.count("trust-reloaded") == 1 and events.count("trust-error") == 1
    inst.allowed_signers.write_text(original)


def test_same_signature_uploaded_again_is_looked_at_again(tmp_path: Path, inst: Institute) -> None:
    """A cut rejected as incomplete is retried when its (deterministic, identical)
    signature is uploaded again after the missing file, as a new upload event."""
    config = make_config(tmp_path, inst, settle_timeout=0)
    agent = Agent(config)
    when = minute_ago(10)
    files = inst.files(when, 1)
    page = files.pop("index.html")
    inst.deliver(config.inbox, files, inst.manifest({**files, "index.html": page}, 1, when))
    assert agent.step().status == "rejected"
    assert agent.step().status == "idle"
    (config.inbox / "index.html").write_bytes(page)
    sig = (config.inbox / "prep-manifest.json.sig").read_bytes()
    time.sleep(0.01)
    (config.inbox / "prep-manifest.json.sig").write_bytes(sig)
    assert agent.step().status == "published"
