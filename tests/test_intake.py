"""Intake (§1.3): events are hints, rescans are the truth; inotify failure falls back to polling.

The inotify limits are per user namespace (/proc/sys/user/max_inotify_*), so
the agent runs inside its own namespace with the limit set to 0: the kernel
then refuses inotify for real (EMFILE for instances, ENOSPC for watches).
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.kit import PREP_AGENT, Institute, make_config, minute_ago, wait_for


def events(journal: Path) -> list[dict[str, object]]:
    if not journal.exists():
        return []
    return [json.loads(line) for line in journal.read_text().splitlines()]


def start_agent(conf: Path, limit: str | None) -> subprocess.Popen[str]:
    command = f"exec {PREP_AGENT} run --config {conf}"
    if limit is not None:
        command = f"echo 0 > /proc/sys/user/{limit} && {command}"
        return subprocess.Popen(
            ["unshare", "-U", "-r", "sh", "-c", command], text=True, stderr=subprocess.PIPE
        )
    return subprocess.Popen(["sh", "-c", command], text=True, stderr=subprocess.PIPE)


@pytest.mark.parametrize(
    ("limit", "mode", "errno_text"),
    [
        (None, "inotify", None),
        ("max_inotify_instances", "polling", "inotify instance limit reached"),
        ("max_inotify_watches", "polling", "inotify watch limit reached"),
    ],
)
def test_watcher_mode_and_fallback(
    tmp_path: Path, limit: str | None, mode: str, errno_text: str | None
) -> None:
    inst = Institute(tmp_path / "inst")
    config = make_config(tmp_path, inst, rescan_interval=0.5)
    agent = start_agent(tmp_path / "prep-agent.conf", limit)
    try:
        wait_for(lambda: any(e["event"] == "agent-started" for e in events(config.journal_file)))
        started = next(e for e in events(config.journal_file) if e["event"] == "agent-started")
        assert started["watcher"] == mode
        if errno_text:
            assert errno_text in str(started["failure"])
        inst.cut(config.inbox, 1, cut_time=minute_ago(5))
        wait_for(lambda: any(e["event"] == "cut-published" for e in events(config.journal_file)))
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=10)
    assert agent.returncode == 0, err
    if errno_text:
        assert "polling the drop folder" in err
