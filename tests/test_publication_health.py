"""A running agent that cannot publish says so (issue 11, finding 4; health-v1 §1:
``fail`` means the agent itself cannot publish).

A real ``prep-agent run`` process; its ``state.json`` is replaced by a folder,
a failure that stops root too. Every step then fails; after
``PUBLICATION_FAIL_STEPS`` of them ``/health`` says ``fail`` with the error in one
line and ``/readyz`` says not ready, and a new cut is not published. Once the file
is back, the next step publishes the cut and health passes again.
"""

from __future__ import annotations

import http.client
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from prep_agent.web.health import (
    PUBLICATION_FAIL_STEPS,
    Snapshot,
    SystemReadings,
    health_document,
)
from tests.kit import AgentDaemon, Institute, make_config, minute_ago, wait_for

TOKEN = "prueba-de-salud"


def get(address: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` from the agent; (status, body)."""
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def health(address: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    code, body = get(address, "/health", token)
    doc: dict[str, Any] = json.loads(body)
    return code, doc


def current_sequence(agent: AgentDaemon) -> int:
    """The sequence ``current`` points to (``status`` needs the state file)."""
    return int(os.readlink(agent.config.current).rpartition("/")[2].split("-")[0])


def publication(doc: dict[str, Any]) -> dict[str, Any]:
    check: dict[str, Any] = doc["checks"]["agent:publication"][0]
    return check


def test_failing_steps_make_health_fail_until_repaired(tmp_path: Path) -> None:
    steps = PUBLICATION_FAIL_STEPS
    inst = Institute(tmp_path / "inst")
    (tmp_path / "token").write_text(TOKEN)
    make_config(tmp_path, inst, rescan_interval=0.5, token_file=tmp_path / "token", allow="")
    agent = AgentDaemon(tmp_path / "prep-agent.conf").start()
    state_file = agent.config.state_file
    try:
        assert agent.address is not None
        address = agent.address
        inst.cut(agent.config.inbox, 1, cut_time=minute_ago(9))
        wait_for(lambda: agent.status()["sequence"] == 1, what="cut 1 published")
        code, doc = health(address, TOKEN)
        assert code == 200 and publication(doc)["status"] == "pass", doc
        assert publication(doc)["observedValue"] is None

        saved = state_file.read_bytes()
        state_file.unlink()
        state_file.mkdir()  # unreadable for root too
        errors_before = sum(e["event"] == "agent-error" for e in agent.journal())

        def failing() -> dict[str, Any] | None:
            code, doc = health(address, TOKEN)
            return doc if code == 503 and publication(doc)["status"] == "fail" else None

        doc = wait_for(failing, what="health fail", alive=agent.proc, context=agent.output)
        errors = [e for e in agent.journal() if e["event"] == "agent-error"]
        assert len(errors) - errors_before >= steps
        error = publication(doc)["observedValue"]
        assert "state.json" in error and "\n" not in error, error
        assert doc["status"] == "fail" and error in doc["output"], doc
        public_code, public = health(address)
        assert (public_code, public["status"]) == (503, "fail")
        assert "agent:publication" not in public["checks"]  # the error text is not public
        assert get(address, "/readyz")[0] == 503

        inst.cut(agent.config.inbox, 2, cut_time=minute_ago(8))
        seen = len(agent.journal())
        wait_for(
            lambda: sum(e["event"] == "agent-error" for e in agent.journal()[seen:]) >= steps,
            what="more failing steps after cut 2 arrived",
        )
        assert current_sequence(agent) == 1
        assert not any(e["event"] == "cut-published" for e in agent.journal()[seen:])

        state_file.rmdir()
        state_file.write_bytes(saved)
        wait_for(lambda: agent.status()["sequence"] == 2, what="cut 2 published after repair")
        code, doc = health(address, TOKEN)
        assert code == 200 and publication(doc)["status"] == "pass", doc
        assert get(address, "/readyz")[0] == 200
        assert any(e["event"] == "agent-recovered" for e in agent.journal()[seen:])
    finally:
        if state_file.is_dir():
            state_file.rmdir()
        assert agent.stop() == 0, agent.output()


def quiet_snapshot(failed_steps: int, last_error: str | None) -> Snapshot:
    return Snapshot(
        now=datetime(2021, 6, 7, 1, 40, tzinfo=timezone.utc),
        service_id="d",
        manifest=None,
        manifest_sha256=None,
        stale_periods=3,
        last_rejection=None,
        watcher_mode="inotify",
        watcher_fallback=False,
        agent_alive=True,
        storage_writable=True,
        system=SystemReadings(disk_percent=40.0, memory_percent=30.0, cpu_percent=5.0),
        failed_steps=failed_steps,
        last_error=last_error,
    )


@pytest.mark.core
@pytest.mark.parametrize(
    ("failed", "expected"),
    [
        (0, "pass"),
        (1, "warn"),
        (PUBLICATION_FAIL_STEPS - 1, "warn"),
        (PUBLICATION_FAIL_STEPS, "fail"),
    ],
)
def test_publication_check_follows_failed_steps(failed: int, expected: str) -> None:
    error = "state file /srv/prep/state.json is unreadable" if failed else None
    doc = health_document(quiet_snapshot(failed, error))
    check = doc["checks"]["agent:publication"][0]
    assert (check["status"], check["observedValue"]) == (expected, error)
    assert (doc["status"] == "fail") == (expected == "fail")
    if expected == "fail":
        assert doc["output"].endswith(f"{failed} steps failed): {error}")
