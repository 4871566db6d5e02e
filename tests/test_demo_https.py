"""``prep-agent demo --source https-package``: the demo in the other mode.

The simulated institute publishes signed PREP package zips over HTTPS on loopback
(a test CA); the agent polls them, verifies the signatures, publishes and serves
the frame on localhost. Ctrl-C stops both.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from pathlib import Path

import requests

from tests.kit import PREP_AGENT, ctrl_c_reaches, free_port, stop_process


def test_demo_polls_signed_packages_over_https_and_serves_the_frame(tmp_path: Path) -> None:
    port = free_port()
    argv = [PREP_AGENT, "demo", "--source", "https-package", "--interval", "0.5"]
    argv += ["--port", str(port), "--dir", str(tmp_path / "demo")]
    demo = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_reaches,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        seen: set[int] = set()
        status: dict[str, object] = {}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and len(seen) < 2:
            with contextlib.suppress(requests.RequestException, ValueError):
                status = requests.get(url + "status.json", timeout=2).json()
                if status.get("sequence"):
                    seen.add(int(status["sequence"]))  # type: ignore[call-overload]
            time.sleep(0.1)
        assert len(seen) >= 2, status  # two packages published, one after the other
        source = status["source"]
        assert isinstance(source, dict)
        assert source["type"] == "https-package" and source["host"] == "127.0.0.1"
        assert source["signed"] is True
        frame = requests.get(url, timeout=2).text
        assert "Corte de información:" in frame and "(UTC-6)" in frame
        assert "descargado de 127.0.0.1 (firmado por el instituto)" in frame
        entry = requests.get(url + str(status["entry"]), timeout=2).text
        assert "generada por el difusor" in entry
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            out, err = demo.communicate(timeout=20)
        finally:
            stop_process(demo)  # no demo outlives a failed test
    assert demo.returncode == 0, err
    assert f"frame: {url}" in out
    assert "institute: serving PREP packages at https://127.0.0.1:" in out
    assert "institute: published https://127.0.0.1:" in out
    assert "cut-rejected" not in err and "source-error" not in err
    config = (tmp_path / "demo" / "prep-agent.conf").read_text()
    assert "type = https-package" in config and "require_signature = true" in config
