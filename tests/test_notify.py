"""systemd notifications: a real unix datagram socket stands where systemd's is."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.kit import PREP_AGENT, Institute, make_config


def test_ready_then_watchdog_then_stopping(tmp_path: Path) -> None:
    inst = Institute(tmp_path / "inst")
    make_config(tmp_path, inst, rescan_interval=0.2)
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(10)
        agent = subprocess.Popen(
            [PREP_AGENT, "run", "--config", str(tmp_path / "prep-agent.conf")],
            env={"NOTIFY_SOCKET": path, "PATH": "/usr/bin:/bin"},
            stderr=subprocess.PIPE,
        )
        try:
            messages = [sock.recv(4096).decode() for _ in range(3)]
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.communicate(timeout=10)
        deadline = time.monotonic() + 5
        rest = []
        sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                rest.append(sock.recv(4096).decode())
            except socket.timeout:
                break
    assert messages[0].startswith("READY=1")
    assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
    assert rest[-1] == "STOPPING=1"
    assert agent.returncode == 0
