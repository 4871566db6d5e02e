"""A restarted origin is not ready before it has looked at its drop folder.

An origin of the HA pair (packaging/ha) restarted while the institute kept
delivering holds a newer cut in its drop folder than the one it serves. HAProxy
puts it back in rotation after two passing ``/readyz`` checks; if those come
before the agent's first scan, viewers get its older cut, a step back that the
rehearsal's HA pair saw. So ``/readyz`` says not ready until that first scan
is done. A real agent, stopped and started again with a large newer cut
waiting (its publication takes a while), is asked ``/readyz`` continuously from
before it starts.
"""

from __future__ import annotations

import threading
from pathlib import Path

import requests

from tests.kit import AgentDaemon, Institute, free_port, make_config, minute_ago, wait_for

FILES = 4000
"""Files of the waiting cut: enough that its publication takes a noticeable time."""


def test_a_restarted_agent_is_not_ready_until_it_has_taken_its_waiting_cut(
    tmp_path: Path,
) -> None:
    inst = Institute(tmp_path / "inst")
    port = free_port()
    config = make_config(tmp_path, inst, listen=f"127.0.0.1:{port}")
    agent = AgentDaemon(tmp_path / "prep-agent.conf").start()
    try:
        inst.cut(config.inbox, 1, cut_time=minute_ago(10))
        wait_for(lambda: agent_sequence(port) == "1", 15, "cut 1 published")
    finally:
        agent.stop()
    when = minute_ago(5)
    files = inst.files(when, 2)
    files.update({f"actas/{n:05d}.txt": f"acta {n}\n".encode() * 20 for n in range(FILES)})
    inst.deliver(config.inbox, files, inst.manifest(files, 2, when))

    seen: list[tuple[int, str]] = []
    done = threading.Event()

    def ask() -> None:
        while not done.is_set():
            try:
                r = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except requests.RequestException:
                continue
            seen.append((r.status_code, r.headers.get("X-Prep-Sequence", "")))
            if r.status_code == 200 and r.headers.get("X-Prep-Sequence") == "2":
                return

    asker = threading.Thread(target=ask)
    asker.start()
    again = AgentDaemon(tmp_path / "prep-agent.conf")
    try:
        again.start()
        asker.join(30)
    finally:
        done.set()
        asker.join(5)
        again.stop()
    assert seen and seen[-1] == (200, "2"), seen[-5:]
    ready = {sequence for code, sequence in seen if code == 200}
    assert ready == {"2"}, f"ready while serving cut 1: {seen.count((200, '1'))} answers"


def agent_sequence(port: int) -> str:
    """The sequence /readyz names (empty when the agent does not answer)."""
    try:
        r = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
    except requests.RequestException:
        return ""
    return r.headers.get("X-Prep-Sequence", "")
