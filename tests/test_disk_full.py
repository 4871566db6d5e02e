"""A full disk during publication loses nothing: the published cut keeps serving,
the failure is journaled, staging is cleaned, and the next cut publishes.

The agent's root is a real 2 MiB tmpfs mounted in the agent's own mount
namespace; the kernel answers ENOSPC for real. The test reads the agent's view
of the file system through /proc/PID/root.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.kit import PREP_AGENT, Institute, make_config, minute_ago, wait_for


def test_disk_full_keeps_current_and_recovers(tmp_path: Path) -> None:
    inst = Institute(tmp_path / "inst")
    config = make_config(tmp_path, inst, rescan_interval=0.5)
    config.root.mkdir()
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {config.root} && "
        f"exec {PREP_AGENT} run --config {tmp_path / 'prep-agent.conf'}"
    )
    agent = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", script], stderr=subprocess.PIPE, text=True
    )
    view = Path(f"/proc/{agent.pid}/root") / str(config.root).lstrip("/")

    def events() -> list[dict[str, Any]]:
        journal = view / "journal.jsonl"
        try:
            return [json.loads(line) for line in journal.read_text().splitlines()]
        except OSError:
            return []

    def published() -> list[int]:
        return [int(e["sequence"]) for e in events() if e["event"] == "cut-published"]

    try:
        inst.cut(config.inbox, 1, cut_time=minute_ago(9))
        wait_for(lambda: published() == [1])
        served = (view / "current" / "index.html").read_bytes()

        when = minute_ago(8)
        files = inst.files(when, 2)
        files["grande.bin"] = b"\0" * (3 * 1024 * 1024)
        inst.deliver(config.inbox, files, inst.manifest(files, 2, when))
        wait_for(lambda: any(e["event"] == "agent-error" for e in events()))
        error = next(e for e in events() if e["event"] == "agent-error")
        assert "No space left on device" in error["detail"]
        assert (view / "current" / "index.html").read_bytes() == served
        assert list((view / "staging").iterdir()) == []
        assert not any(e["event"] == "cut-rejected" for e in events())

        inst.cut(config.inbox, 3, cut_time=minute_ago(7))
        wait_for(lambda: published() == [1, 3])
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=10)
    assert agent.returncode == 0, err
