"""The drop-folder watcher (§1.3) on a real agent process: idle means idle, and a
lost watch is reported and re-armed.

With ``rescan_interval = 60`` a cut published within a few seconds was found by
an inotify event, not by a rescan. The idle test fails only with a watchdog
that reports the agent's own reads (opens from 2.3, read-only closes from 5.0);
Debian 12's watchdog 2.2.1 reports neither, so there it passes with or without
the fix: the ``make test-latest`` leg runs it on the newest watchdog.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.kit import PREP_AGENT, AgentDaemon, Institute, make_config, minute_ago, wait_for

RESCAN = 60
"""Seconds between rescans: far longer than any wait below."""
PROMPT = 5.0
"""Seconds within which a cut woken by an event is published."""
IDLE_SECONDS = 3.0
"""How long the idle agent is watched."""
IDLE_CPU_SECONDS = 0.3
"""CPU time the agent may use in ``IDLE_SECONDS`` (10 %); the loop that woke itself on
its own reads used over 2 s of CPU in 3 s (watchdog 7.1)."""

UNSHARE = ("unshare", "--user", "--map-root-user", "--mount")
"""Runs a command in new user and mount namespaces (private mounts), as their root."""
NSENTER = ("nsenter", "--user", "--mount")
"""Enters those namespaces (``-t PID`` follows)."""

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


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


def watcher_check(daemon: AgentDaemon) -> tuple[str, str]:
    """Status and observed value of ``inbox:watcher`` in the full /health (loopback is allowed)."""
    with _DIRECT.open(f"http://{daemon.address}/health", timeout=5) as response:
        doc = json.loads(response.read())
    check = doc["checks"]["inbox:watcher"][0]
    return str(check["status"]), str(check["observedValue"])


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


def test_inbox_replaced_by_rename_rearms_the_watch(
    agent: tuple[AgentDaemon, Institute], tmp_path: Path
) -> None:
    daemon, institute = agent
    inbox = daemon.config.inbox
    os.rename(inbox, tmp_path / "inbox.old")
    inbox.mkdir()
    wait_for(
        lambda: any(e["event"] == "watcher-rearmed" for e in daemon.journal()),
        PROMPT,
        "the watch re-armed on the new drop folder",
        alive=daemon.proc,
        context=daemon.output,
    )
    lost = [str(e["detail"]) for e in daemon.journal() if e["event"] == "watcher-lost"]
    # "gone" if a check fell between the rename and the mkdir.
    assert len(lost) == 1 and ("replaced" in lost[0] or "gone" in lost[0]), lost
    assert watcher_check(daemon) == ("pass", "inotify")
    institute.cut(inbox, 2, cut_time=minute_ago(5))
    wait_published(daemon, 2, PROMPT)


def test_inbox_deleted_reports_polling_until_made_again(
    agent: tuple[AgentDaemon, Institute],
) -> None:
    daemon, institute = agent
    inbox = daemon.config.inbox
    shutil.rmtree(inbox)
    wait_for(lambda: watcher_check(daemon) == ("warn", "polling"), PROMPT, "polling reported")
    inbox.mkdir()
    wait_for(lambda: watcher_check(daemon) == ("pass", "inotify"), PROMPT, "inotify reported")
    events = [e["event"] for e in daemon.journal()]
    assert events.count("watcher-lost") == 1 and events.count("watcher-rearmed") == 1, events
    institute.cut(inbox, 2, cut_time=minute_ago(5))
    wait_published(daemon, 2, PROMPT)


def test_inbox_mounted_over_rearms_the_watch(tmp_path: Path) -> None:
    """A file system mounted over the drop folder hides the watched folder without
    an event. The agent runs in its own user and mount namespaces (``unshare``),
    so the tmpfs exists only for it and goes away with it."""
    institute = Institute(tmp_path / "institute")
    config = make_config(tmp_path, institute, rescan_interval=RESCAN)
    institute.cut(config.inbox, 1, cut_time=minute_ago(10))
    daemon = AgentDaemon(tmp_path / "prep-agent.conf", command=(*UNSHARE, PREP_AGENT))
    daemon.start()
    try:
        wait_published(daemon, 1)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        mount = [*NSENTER, "-t", str(pid), "mount", "-t", "tmpfs", "tmpfs", str(config.inbox)]
        subprocess.run(mount, check=True, timeout=30)
        wait_for(
            lambda: any(e["event"] == "watcher-rearmed" for e in daemon.journal()),
            PROMPT,
            "the watch re-armed on the mounted drop folder",
            alive=daemon.proc,
            context=daemon.output,
        )
        assert watcher_check(daemon) == ("pass", "inotify")
        # The mount is seen only inside the agent's namespace: deliver through its root.
        institute.cut(Path(f"/proc/{pid}/root{config.inbox}"), 2, cut_time=minute_ago(5))
        wait_published(daemon, 2, PROMPT)
    finally:
        daemon.stop()
