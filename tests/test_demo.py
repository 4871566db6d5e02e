"""The README's first command: agent + simulated institute + HTTP on localhost."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time

import requests
from cutkit import PREP_AGENT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_publishes_and_serves_then_stops_on_ctrl_c() -> None:
    port = free_port()
    demo = subprocess.Popen(
        [PREP_AGENT, "demo", "--interval", "0.5", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        body = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "Actas capturadas: 1200" not in body:
            with contextlib.suppress(requests.ConnectionError):
                body = requests.get(url, timeout=2).text
            time.sleep(0.1)
        assert "Corte de información:" in body and "(UTC-6)" in body
        assert "Actas capturadas: 1200" in body  # the third cut replaced the first two
        csv = requests.get(url + "datos/COAH_AYUN_2021.csv", timeout=2).text.splitlines()
        assert csv[1].endswith("(UTC-6)")
    finally:
        demo.send_signal(signal.SIGINT)
        out, err = demo.communicate(timeout=15)
    assert demo.returncode == 0, err
    assert f"published cut: http://127.0.0.1:{port}/" in out
    assert "cut-rejected" not in err
