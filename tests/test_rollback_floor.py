"""A lost or stale state file cannot reopen replay (issue 11, finding 5; §4.3).

After an operator rollback, the rollback floor is above the published cut. It
is kept in ``state.json`` and witnessed by the journal. With releases on disk the
agent refuses to start without a readable state file and names the command that
re-creates it; a state file older than the journal is raised to the journal's
word; an operator's ``reset-sequence`` (a leaked key) is the newest word.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from prep_agent import cli
from prep_agent.agent.floor import JournalFloor
from prep_agent.agent.journal import Journal
from prep_agent.core.errors import Error
from prep_agent.daemon import Agent
from tests.kit import PREP_AGENT, AgentDaemon, Institute, make_config, minute_ago, wait_for

SIG = "prep-manifest.json.sig"


@pytest.fixture
def inst(tmp_path: Path) -> Institute:
    return Institute(tmp_path / "inst")


def conf(tmp_path: Path) -> str:
    return str(tmp_path / "prep-agent.conf")


def prep_agent(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command on this test's config (a refusing ``run`` exits at once)."""
    return subprocess.run(
        [PREP_AGENT, *args, "--config", conf(tmp_path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
    )


def upload_again(inbox: Path, signature: bytes) -> None:
    """The institute uploads a signature again: same bytes, a new file."""
    tmp = inbox / ".sig.part"
    tmp.write_bytes(signature)
    os.replace(tmp, inbox / SIG)


def current_sequence(root: Path) -> int:
    return int(os.readlink(root / "current").rpartition("/")[2].split("-")[0])


def events(root: Path) -> list[dict[str, Any]]:
    lines = (root / "journal.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def publish(tmp_path: Path, inst: Institute, sequence: int) -> bytes:
    """Deliver a valid cut and publish it with ``run --once``; return its signature."""
    inbox = tmp_path / "inbox"
    inst.cut(inbox, sequence, cut_time=minute_ago(30 - sequence))
    assert cli.main(["run", "--once", "--config", conf(tmp_path)]) == 0
    return (inbox / SIG).read_bytes()


def test_lost_state_after_rollback_refuses_start_then_replay_stays_out(
    tmp_path: Path, inst: Institute
) -> None:
    make_config(tmp_path, inst, rescan_interval=0.5)
    root = tmp_path / "root"
    publish(tmp_path, inst, 1)
    signature_2 = publish(tmp_path, inst, 2)
    digest_2 = hashlib.sha256((tmp_path / "inbox/prep-manifest.json").read_bytes()).hexdigest()
    assert prep_agent(tmp_path, "rollback", "--to", "1").returncode == 0
    assert current_sequence(root) == 1
    (root / "state.json").unlink()
    upload_again(tmp_path / "inbox", signature_2)  # the old signed cut 2, delivered again

    for args in (["run"], ["run", "--once"], ["verify"]):
        refused = prep_agent(tmp_path, *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        line = refused.stderr.strip()
        assert "\n" not in line and "state.json is missing" in line, line
        assert "prep-agent reset-sequence --to 2" in line, line
    assert current_sequence(root) == 1
    assert [e["sequence"] for e in events(root) if e["event"] == "cut-published"] == [1, 2]

    reset = prep_agent(tmp_path, "reset-sequence", "--to", "2")
    assert reset.returncode == 0, reset.stderr
    state = json.loads((root / "state.json").read_text())
    assert (state["highest_sequence"], state["highest_manifest_sha256"]) == (2, digest_2)
    agent = AgentDaemon(tmp_path / "prep-agent.conf").start()
    try:
        decided = wait_for(
            lambda: [e for e in agent.journal() if e["event"] in ("cut-replay", "cut-rejected")],
            what="cut 2 decided again",
            alive=agent.proc,
            context=agent.output,
        )
    finally:
        assert agent.stop() == 0, agent.output()
    assert decided[0]["event"] == "cut-replay" and decided[0]["sequence"] == 2
    assert current_sequence(root) == 1
    assert [e["sequence"] for e in events(root) if e["event"] == "cut-published"] == [1, 2]
    reset_line = [e for e in events(root) if e["event"] == "operator-reset-sequence"][-1]
    assert reset_line["state_lost"].endswith("state.json is missing")


def test_stale_state_is_raised_to_the_journal(tmp_path: Path, inst: Institute) -> None:
    """A state file restored from before a cut cannot lower the floor below the journal."""
    config = make_config(tmp_path, inst)
    publish(tmp_path, inst, 1)
    old_state = config.state_file.read_bytes()
    signature_2 = publish(tmp_path, inst, 2)
    assert cli.main(["rollback", "--config", conf(tmp_path), "--to", "1"]) == 0
    config.state_file.write_bytes(old_state)  # a backup from before cut 2
    upload_again(config.inbox, signature_2)

    assert Agent(config).step().status == "replay"
    assert current_sequence(config.root) == 1
    assert json.loads(config.state_file.read_text())["highest_sequence"] == 2


def test_reset_after_a_leaked_key_is_the_newest_word(tmp_path: Path, inst: Institute) -> None:
    """Cut 3 was signed with a leaked key: roll back, lower the floor to 2; the retained
    release 3 neither raises the floor nor the recovery hint, and the institute's real
    cut 3 publishes."""
    config = make_config(tmp_path, inst)
    for sequence in (1, 2, 3):
        publish(tmp_path, inst, sequence)
    assert cli.main(["rollback", "--config", conf(tmp_path), "--to", "2"]) == 0
    assert cli.main(["reset-sequence", "--config", conf(tmp_path), "--to", "2"]) == 0
    assert Agent(config).state.highest_sequence == 2

    config.state_file.unlink()
    with pytest.raises(Error, match=r"reset-sequence --to 2`"):
        Agent(config)
    assert cli.main(["reset-sequence", "--config", conf(tmp_path), "--to", "2"]) == 0

    inst.cut(config.inbox, 3, cut_time=minute_ago(20))
    assert Agent(config).step().status == "published"
    assert current_sequence(config.root) == 3
    assert len([n for n in os.listdir(config.releases) if n.startswith("0" * 15 + "3")]) == 2


def test_running_agent_stops_publishing_when_the_state_goes(
    tmp_path: Path, inst: Institute
) -> None:
    config = make_config(tmp_path, inst)
    agent = Agent(config)
    inst.cut(config.inbox, 1)
    assert agent.step().status == "published"
    shutil.move(config.state_file, tmp_path / "state.json.bak")
    inst.cut(config.inbox, 2)
    with pytest.raises(Error, match="reset-sequence --to 1`"):
        agent.step()
    assert current_sequence(config.root) == 1
    shutil.move(tmp_path / "state.json.bak", config.state_file)
    assert agent.step().status == "published"


def test_first_start_writes_the_state_before_any_release(tmp_path: Path, inst: Institute) -> None:
    """A crash during the very first publication leaves a state file beside the release."""
    config = make_config(tmp_path, inst)
    Agent(config)
    assert json.loads(config.state_file.read_text())["highest_sequence"] == 0


@pytest.mark.core
def test_journal_floor_reads_only_new_lines(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    floor = JournalFloor(path)
    assert floor.read().sequence == 0  # no journal yet
    journal.write("cut-published", sequence=4, manifest_sha256="a" * 64, release="4-a")
    journal.write("cut-rejected", sequence=9, reason="rollback")
    assert (floor.read().sequence, floor.read().manifest_sha256) == (4, "a" * 64)
    journal.write("operator-rollback", release_from="4-a", release_to="3-c")
    journal.write("operator-reset-sequence", sequence_from=4, sequence_to=3, manifest_sha256=None)
    word = floor.read()
    assert (word.sequence, word.manifest_sha256, word.set_aside) == (3, None, {"4-a", "3-c"})
    with open(path, "ab") as fh:
        fh.write(b'{"event": "cut-published", "sequence": 7')  # a line being written
    assert floor.read().sequence == 3
    with open(path, "ab") as fh:
        fh.write(b', "release": "7-b"}\n')
    assert floor.read().sequence == 7
    assert floor.read().set_aside == {"4-a", "3-c"}
    path.write_text("")  # replaced: read from its start
    journal.write("cut-published", sequence=2, manifest_sha256="b" * 64, release="2-b")
    assert floor.read().sequence == 2 and floor.read().set_aside == frozenset()
