"""The agent without its report package: ``prep-agent report`` says what to install.

The packages put ``prep_agent/report`` in prep-agent-report (packaging/README.md).
Here the command runs from a copy of this tree without that folder, in a fresh
interpreter that sees only the copy and the runtime dependencies: what a host
with only the prep-agent package has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kit import ELECTION, Institute

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def agent_only(tmp_path: Path) -> Path:
    """A folder holding ``prep_agent`` as the prep-agent package installs it."""
    site = tmp_path / "site"
    shutil.copytree(
        ROOT / "prep_agent",
        site / "prep_agent",
        ignore=shutil.ignore_patterns("report", "__pycache__"),
    )
    return site


def prep_agent(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``prep-agent ARGS`` with only ``site`` and the dependencies importable
    (``-S``: no site-packages hooks, so no editable install of this tree)."""
    others = [
        p for p in sys.path if p and Path(p).is_dir() and not (Path(p) / "prep_agent").exists()
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *others])}
    return subprocess.run(
        [sys.executable, "-S", "-m", "prep_agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=site.parent,
        timeout=60,
    )


@pytest.mark.core
def test_report_names_the_package_to_install(agent_only: Path, tmp_path: Path) -> None:
    proc = prep_agent(
        agent_only,
        "report",
        "--access-log",
        str(tmp_path / "access.log"),
        "--from",
        "2021-06-06T00:00:00-05:00",
        "--to",
        "2021-06-08T00:00:00-05:00",
        "--baseline-from",
        "2021-06-04T00:00:00-05:00",
        "--baseline-to",
        "2021-06-06T00:00:00-05:00",
        "--out",
        str(tmp_path / "out"),
        "--pdf",
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr == (
        "prep-agent: the memoria técnica is in the package prep-agent-report: "
        "apt install prep-agent-report (EL9: dnf install prep-agent-report)\n"
    )
    assert not (tmp_path / "out").exists()
    bare = prep_agent(agent_only, "report")
    assert bare.returncode == 2 and "apt install prep-agent-report" in bare.stderr


@pytest.mark.core
def test_help_lists_report_with_its_package(agent_only: Path) -> None:
    proc = prep_agent(agent_only, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "write the memoria técnica (package prep-agent-report)" in proc.stdout
    sub = prep_agent(agent_only, "report", "--help")
    assert sub.returncode == 0 and "usage: prep-agent report" in sub.stdout


# Not core: the fake institute signs with ssh-keygen.
def test_the_agent_works_without_the_report(agent_only: Path, tmp_path: Path) -> None:
    inst = Institute(tmp_path / "inst")
    root = tmp_path / "srv"
    proc = prep_agent(
        agent_only,
        "init",
        "--root",
        str(root),
        "--election",
        ELECTION,
        "--trust",
        str(inst.allowed_signers),
    )
    assert proc.returncode == 0, proc.stderr
    inst.cut(root / "inbox", 1)
    run = prep_agent(agent_only, "run", "--once", "--config", str(root / "prep-agent.conf"))
    assert run.returncode == 0 and run.stdout.startswith("published: sequence 1"), run.stderr
    # Unknown options are still refused everywhere else.
    bad = prep_agent(agent_only, "status", "--config", str(root / "prep-agent.conf"), "--bogus")
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
