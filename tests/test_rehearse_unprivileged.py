"""``prep-agent rehearse --mode loopback`` run by an unprivileged user: the
faults that need root are reported not available, with why; every other one is
injected and detected, and the verdict passes.

The test (root, as CI) runs the real command as ``nobody`` (uid and gid 65534,
no supplementary groups, no capabilities: ``setpriv``) in a private mount
namespace (``unshare --mount``) where the checkout and the interpreter's venv
are bind-mounted under a world-traversable temporary folder: the clone may
live where nobody cannot go (``/root``, mode 700), and it is neither chmodded
nor given ACLs. Everything the run writes (its --out, HOME, TMPDIR) is in a
folder nobody owns. The environment keeps root's ``USER`` and ``LOGNAME``, as
``setpriv`` (or ``su`` without a login) leaves them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from prep_agent.rehearsal import skew
from tests.test_rehearse import INJECTED, NOT_AVAILABLE

pytestmark = pytest.mark.drill

NOBODY = 65534
NEEDS_ROOT = {"disk-full", "balancer-kill", "origin-stop"}
"""Faults a user cannot inject: a tmpfs mount, the HA pair's network namespaces."""


def test_an_unprivileged_user_rehearses_on_loopback(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user in a private mount namespace")
    missing = [tool for tool in ("unshare", "setpriv") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"util-linux's {', '.join(missing)} not found")
    checkout = Path(__file__).resolve().parents[1]
    venv = Path(sys.prefix)
    top = Path(tempfile.mkdtemp(prefix="prep-sin-root-"))
    own, out = top / "nobody", top / "nobody" / "ensayo"
    try:
        top.chmod(0o755)  # our own folder, not the checkout's: nobody may traverse it
        mounts = [(checkout, top / "src")]
        python = Path(sys.executable)
        if sys.prefix != sys.base_prefix:  # a venv: its python, from the mounted path
            inside = venv.is_relative_to(checkout)
            base = top / "src" / venv.relative_to(checkout) if inside else top / "venv"
            if not inside:
                mounts.append((venv, base))
            python = base / Path(sys.executable).relative_to(venv)
        for folder in (own, own / "home", own / "tmp"):
            folder.mkdir()
            os.chown(folder, NOBODY, NOBODY)
        script = "".join(
            f"mkdir -p {shlex.quote(str(where))} && mount --bind {shlex.quote(str(what))} "
            f"{shlex.quote(str(where))} && "
            for what, where in mounts
        )
        script += "exec setpriv --reuid {u} --regid {u} --clear-groups --inh-caps=-all "
        script += '--bounding-set=-all "$@"'
        env = {
            **os.environ,
            "HOME": str(own / "home"),
            "TMPDIR": str(own / "tmp"),
            "PYTHONPATH": str(top / "src"),
            "USER": "root",
            "LOGNAME": "root",
        }
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                script.format(u=NOBODY), "sh", "nice", str(python), "-m", "prep_agent.cli",
                "rehearse", "--out", str(out), "--cuts", "8", "--period", "2",
                "--mode", "loopback", "--no-browser"]  # fmt: skip
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=own, env=env, start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = child.communicate(timeout=240)
        finally:  # the rehearsal's sshd, agents and collector are in its process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        report = out / "rehearsal.json"
        assert report.exists(), output
        assert report.stat().st_uid == NOBODY
        doc: dict[str, Any] = json.loads(report.read_text(encoding="utf-8"))
    finally:
        with contextlib.suppress(OSError, shutil.Error):  # kept to read after a failure
            shutil.copytree(out, tmp_path / "ensayo", symlinks=True)
        shutil.rmtree(top, ignore_errors=True)  # the mounts went with the namespace
    assert child.returncode == 0, output
    assert doc["verdict"] == "pass" and doc["problems"] == [], doc["problems"]
    assert doc["options"]["root"] is False and doc["options"]["mode"] == "loopback"
    kinds = {f["kind"]: f for f in doc["faults"]}
    assert set(kinds) == INJECTED | NOT_AVAILABLE
    unavailable = NEEDS_ROOT | ({"clock-skew"} if skew.library() is None else set())
    for kind, fault in kinds.items():
        if kind in unavailable:
            assert fault["status"] == "not-available" and fault["detected_at"] is None, fault
            assert fault["detail"], fault  # why, for the report
        else:
            assert fault["status"] == "detected", fault
            assert fault["injected_at"] <= fault["detected_at"] and fault["detected_by"], fault
    last = doc["cuts"][-1]["difusores"]
    assert all(last[d]["published"] for d in ("a", "b", "c")), last
