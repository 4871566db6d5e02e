"""A command loads what it runs (docs/decisions.md, Layout of the code): the
command line starts without Flask, requests or the simulated institute, which
only the serving daemon, the pusher, the https source and the demo need."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LAZY = ("flask", "requests", "prep_agent.institute.simulation")
"""Modules no command loads at start-up."""


@pytest.mark.core
def test_the_command_line_starts_without_flask_requests_or_the_simulation() -> None:
    code = (
        "import json, sys\n"
        "from prep_agent.cli.main import build_parser\n"
        "build_parser()\n"
        f"print(json.dumps([m for m in {list(LAZY)!r} if m in sys.modules]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [], proc.stdout
