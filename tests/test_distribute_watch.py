"""``prep-agent distribute --watch``: new cuts as they appear, a real agent behind one
target (publication confirmed on its status.json), and supersession: a failing
target goes straight to the newest cut, never the backlog."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import requests

from tests.distkit import BlackHole, Sshd, Target, write_config
from tests.kit import PREP_AGENT, AgentDaemon, Institute, free_port, keygen, make_config, wait_for
from tests.sftpkit import make_cut
from tests.test_distribute import T0


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[Sshd, Path]]:
    key = tmp_path / "institute_upload"
    server = Sshd(tmp_path / "sshd", [keygen(key)]).start()
    try:
        yield server, key
    finally:
        server.stop()


def rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            return list(conn.execute(sql))
        except sqlite3.OperationalError:  # tables not created yet
            return []


def test_watch_publishes_confirms_and_supersedes(tmp_path: Path, sshd: tuple[Sshd, Path]) -> None:
    server, upload_key = sshd
    institute = Institute(tmp_path / "institute")
    port = free_port()
    agent_conf = make_config(
        tmp_path / "agent", institute, listen=f"127.0.0.1:{port}", rescan_interval=1
    )
    common = {"port": server.port, "host_key": server.known_hosts_line(), "identity": upload_key}
    agent_target = Target(
        "con-agente",
        agent_conf.inbox,
        status_url=f"http://127.0.0.1:{port}/status.json",
        **common,  # type: ignore[arg-type]
    )
    late = Target("tardio", tmp_path / "tardio", **common)  # type: ignore[arg-type]
    conf = write_config(
        tmp_path / "institute.conf", institute.allowed_signers, [agent_target, late], retry_for=60
    )
    db = tmp_path / "collector.sqlite"
    outbox, staging = tmp_path / "salida", tmp_path / "staging"
    outbox.mkdir()

    def publish(sequence: int) -> None:
        cut = make_cut(institute, staging, sequence, T0 + timedelta(minutes=sequence))
        os.rename(cut.local, outbox / f"{sequence:06d}")

    agent = AgentDaemon(tmp_path / "agent" / "prep-agent.conf").start(timeout=20)
    watch = subprocess.Popen(
        [PREP_AGENT, "distribute", "--config", str(conf), "--watch", str(outbox)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        publish(1)
        wait_for(
            lambda: rows(db, "SELECT published_at FROM delivery_target "
                         "WHERE difusor = 'con-agente' AND published_sequence = 1"),
            20,
            "cut 1 confirmed on the agent's status.json",
            alive=watch,
        )  # fmt: skip
        assert requests.get(agent_target.status_url or "", timeout=2).json()["sequence"] == 1
        first_late = "SELECT COUNT(*) FROM delivery_attempt WHERE difusor = 'tardio'"
        wait_for(
            lambda: (rows(db, first_late) or [(0,)])[0][0] >= 1, 10, "a failed attempt", alive=watch
        )
        publish(2)  # supersedes cut 1 on the failing target
        wait_for(
            lambda: rows(db, "SELECT 1 FROM delivery_attempt WHERE difusor = 'tardio' "
                         "AND sequence = 2"),
            10,
            "the failing target to move on to cut 2",
            alive=watch,
        )  # fmt: skip
        late.inbox.mkdir()  # it recovers
        wait_for(
            lambda: rows(db, "SELECT acked_sequence FROM delivery_target "
                         "WHERE difusor = 'tardio'") == [(2,)],
            15,
            "the recovered target to hold cut 2",
            alive=watch,
        )  # fmt: skip
        attempts = rows(db, "SELECT sequence, result FROM delivery_attempt WHERE difusor='tardio'")
        seqs = [a[0] for a in attempts]
        assert seqs == sorted(seqs), "never back to cut 1 once cut 2 is offered"
        assert (1, "delivered") not in attempts
        assert attempts[-1] == (2, "delivered")
        assert (late.inbox / "prep-manifest.json").read_bytes() == (
            outbox / "000002" / "prep-manifest.json"
        ).read_bytes()
        wait_for(
            lambda: rows(db, "SELECT acked_sequence FROM delivery_target "
                         "WHERE difusor = 'con-agente'") == [(2,)],
            10,
            "cut 2 on the agent's target",
            alive=watch,
        )  # fmt: skip
        # ControlMaster/ControlPersist: one login per target for every cut and retry
        logins = server.log.read_text().count("Accepted publickey")
        assert logins == 2, f"{logins} ssh logins for 2 targets, {len(attempts)} attempts"
        latency = rows(db, "SELECT delivered_at - ready_at, published_at - delivered_at "
                       "FROM delivery_target WHERE difusor = 'con-agente'")  # fmt: skip
        assert latency and all(isinstance(v, float) and 0 <= v < 20 for v in latency[0])
    finally:
        watch.send_signal(signal.SIGTERM)
        try:
            out, _ = watch.communicate(timeout=20)
        finally:
            watch.kill()
            agent.stop()
    assert watch.returncode == 0, out
    assert "delivered cut 2 tardio" in out


def test_a_newer_cut_stops_an_upload_still_in_flight(
    tmp_path: Path, sshd: tuple[Sshd, Path]
) -> None:
    server, upload_key = sshd
    institute = Institute(tmp_path / "institute")
    with BlackHole(2) as hole:
        dark = Target(
            "sin-respuesta",
            tmp_path / "dark",
            host=hole.address,
            host_key=server.known_hosts_line(),
            identity=upload_key,
        )
        conf = write_config(
            tmp_path / "institute.conf", institute.allowed_signers, [dark], connect_timeout=30
        )
        db = tmp_path / "collector.sqlite"
        outbox, staging = tmp_path / "salida", tmp_path / "staging"
        outbox.mkdir()
        watch = subprocess.Popen(
            [PREP_AGENT, "distribute", "--config", str(conf), "--watch", str(outbox)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            for sequence in (1, 2):
                cut = make_cut(institute, staging, sequence, T0 + timedelta(minutes=sequence))
                os.rename(cut.local, outbox / f"{sequence:06d}")
                wait_for(
                    lambda n=sequence: rows(  # type: ignore[misc]
                        db, f"SELECT 1 FROM distributed_cut WHERE sequence = {n}"
                    ),
                    10,
                    f"cut {sequence} offered",
                    alive=watch,
                )  # fmt: skip
                time.sleep(1)
            wait_for(
                lambda: rows(db, "SELECT result, ended - started FROM delivery_attempt"),
                10,
                "the first attempt to end",
                alive=watch,
            )
            (result, seconds), *_ = rows(db, "SELECT result, ended - started FROM delivery_attempt")
            assert result == "superseded"
            assert 0.5 < float(seconds) < 5  # type: ignore[arg-type]
        finally:
            watch.send_signal(signal.SIGTERM)
            try:
                out, _ = watch.communicate(timeout=20)
            finally:
                watch.kill()
    assert watch.returncode == 0, out
    assert "superseded cut 1 sin-respuesta" in out
