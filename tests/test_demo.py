"""The README's first command: agent + simulated institute + frame on localhost."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time

import requests

from tests.kit import PREP_AGENT, ctrl_c_reaches, free_port, stop_process


def test_demo_publishes_and_serves_then_stops_on_ctrl_c() -> None:
    port = free_port()
    demo = subprocess.Popen(
        [PREP_AGENT, "demo", "--interval", "0.5", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_reaches,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        status: dict[str, object] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and int(status.get("sequence") or 0) < 3:
            with contextlib.suppress(requests.RequestException, ValueError):
                status = requests.get(url + "status.json", timeout=2).json()
            time.sleep(0.1)
        assert int(status["sequence"] or 0) >= 3, status  # type: ignore[call-overload]
        frame = requests.get(url, timeout=2).text
        assert "Corte de información:" in frame and "(UTC-6)" in frame
        entry = requests.get(url + str(status["entry"]), timeout=2).text
        assert "Actas capturadas" in entry
        stamp = frame.split("Corte de información:")[1]
        assert str(status["cut_time"])[:10].split("-")[0] in stamp
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            out, err = demo.communicate(timeout=15)
        finally:
            stop_process(demo)  # no demo outlives a failed test
    assert demo.returncode == 0, err
    assert f"frame: {url}" in out
    assert "institute: delivered cut 3" in out
    assert "cut-rejected" not in err
