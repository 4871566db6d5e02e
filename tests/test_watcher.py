"""The drop-folder watcher (§1.3) on a real agent process: idle means idle.

With ``rescan_interval = 60`` a cut published within a few seconds was found by
an inotify event, not by a rescan. The idle test fails only with a watchdog
that reports the agent's own reads (opens from 2.3, read-only closes from 5.0);
Debian 12's watchdog 2.2.1 reports neither, so there it passes with or without
the fix: the ``make test-latest`` leg runs it on the newest watchdog.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.kit import AgentDaemon, Institute, make_config, minute_ago, wait_for

RESCAN = 60
"""Seconds between rescans: far longer than any wait below."""
PROMPT = 5.0
"""Seconds within which a cut woken by an event is published."""
IDLE_SECONDS = 3.0
"""How long the idle agent is watched."""
IDLE_CPU_SECONDS = 0.3
"""CPU time the agent may use in ``IDLE_SECONDS`` (10 %); the loop that woke itself on
its own reads used over 2 s of CPU in 3 s (watchdog 7.1)."""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentDaemon, Institute]]:
    """A running agent (rescans every minute) that has published cut 1."""
    institute = Institute(tmp_path / "institute")
    config = make_config(tmp_path, institute, rescan_interval=RESCAN)
    institute.cut(config.inbox, 1, cut_time=minute_ago(10))
    daemon = AgentDaemon(tmp_path / "prep-agent.conf").start()
    try:
        wait_published(daemon, 1)
        yield daemon, institute
    finally:
        daemon.stop()


def published(daemon: AgentDaemon, sequence: int) -> bool:
    return any(
        e["event"] == "cut-published" and e["sequence"] == sequence for e in daemon.journal()
    )


def wait_published(daemon: AgentDaemon, sequence: int, timeout: float = 20.0) -> None:
    wait_for(
        lambda: published(daemon, sequence),
        timeout,
        f"cut {sequence} published",
        alive=daemon.proc,
        context=daemon.output,
    )


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def test_idle_agent_stays_idle_and_wakes_on_the_next_cut(
    agent: tuple[AgentDaemon, Institute],
) -> None:
    daemon, institute = agent
    assert daemon.proc is not None
    time.sleep(0.5)  # let the publication's own work end
    before = cpu_seconds(daemon.proc.pid)
    time.sleep(IDLE_SECONDS)
    used = cpu_seconds(daemon.proc.pid) - before
    assert used < IDLE_CPU_SECONDS, f"idle agent used {used:.2f} s of CPU in {IDLE_SECONDS} s"
    # The agent still wakes on the events that make a delivery.
    institute.cut(daemon.config.inbox, 2, cut_time=minute_ago(5))
    wait_published(daemon, 2, PROMPT)
