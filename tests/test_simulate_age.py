"""``prep-agent simulate --age``: cuts signed with a cut time that many seconds old
(to the second), which the real agent accepts (the CSV stamps denote the same
minute, spec §4.7) and which come due for the interruption notice sooner.
"""

from __future__ import annotations

import json
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

from prep_agent.core import sshkeys
from prep_agent.core.freshness import STALE, freshness
from prep_agent.core.manifest import WELL_KNOWN
from prep_agent.daemon import Agent
from prep_agent.institute import delivery
from prep_agent.institute.simulation import run
from prep_agent.institute.simulation.election import Simulation
from tests.kit import PREP_AGENT, Institute, make_config

OFFSET = timezone(timedelta(hours=-6))


def test_aged_cuts_are_published_and_come_due_after_the_compressed_periods(
    tmp_path: Path, institute: Institute
) -> None:
    config = make_config(tmp_path, institute)
    agent = Agent(config)
    key = sshkeys.load_private_key(institute.key.read_bytes())
    clock = datetime.now(OFFSET).replace(second=7, microsecond=0) - timedelta(minutes=1)
    times = iter([clock, clock + timedelta(seconds=2)])
    statuses = []

    def deliver(folder: Path) -> None:
        delivery.deliver_local(folder, config.inbox)
        statuses.append(agent.step(settle=False).status)

    age = 3 * 600 - 4 * 2.0
    run.run_institute(
        Simulation(), key, tmp_path / "out", deliver, 0, 2, threading.Event(),
        lambda: next(times), age=age,
    )  # fmt: skip
    assert statuses == ["published", "published"]
    doc = json.loads((config.current / WELL_KNOWN / "manifest.json").read_bytes())
    cut_time = datetime.fromisoformat(doc["cut_time"])
    assert cut_time == clock + timedelta(seconds=2) - timedelta(seconds=age)
    assert cut_time.second != 0  # to the second, not the minute
    assert doc["signed_at"] == (clock + timedelta(seconds=2)).isoformat(timespec="seconds")
    manifest = agent.store.current()
    assert manifest is not None
    due = clock + timedelta(seconds=2 + 4 * 2.0)  # four compressed periods after signing
    assert freshness(manifest.manifest, due - timedelta(seconds=1), 3) != STALE
    assert freshness(manifest.manifest, due + timedelta(seconds=1), 3) == STALE


def test_simulate_refuses_a_negative_age(tmp_path: Path, institute: Institute) -> None:
    done = subprocess.run(
        [PREP_AGENT, "simulate", "--key", str(institute.key), "--out", str(tmp_path / "o"),
         "--inbox", str(tmp_path / "i"), "--cuts", "1", "--age", "-5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0 and "--age must be at least 0" in done.stderr
