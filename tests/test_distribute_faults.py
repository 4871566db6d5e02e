"""``prep-agent distribute`` faults on real sshd/sftp: a connection that dies
mid-file, a cut folder that changes while it is being distributed, and a
recovered target that gets the newest cut, not the backlog; the progress line
on a terminal and the one-line events elsewhere.

The mid-file drop is made deterministic with a limit: the target's sshd runs
with ``RLIMIT_FSIZE`` below the size of a file of the cut, so the session
process that writes it is killed by ``SIGXFSZ`` at that offset and the
connection closes under the client, every time. The target "recovers" when
its sshd is restarted without the limit (same port, same host key); its old
connection process, still limited, outlives the restart, so the retry must
open a new connection rather than reuse the multiplexed one.
"""

from __future__ import annotations

import resource
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from prep_agent.core.manifest import SIGNATURE_NAME
from prep_agent.institute.collector.deliveries import DeliveryLog, target_summary
from tests.distkit import Sshd, Target, write_config
from tests.kit import (
    PREP_AGENT,
    AgentDaemon,
    Institute,
    keygen,
    make_config,
    stop_process,
    tree_digest,
    wait_for,
    wait_port,
)
from tests.sftpkit import make_cut
from tests.test_distribute import T0, holds

BIG = 4 * 1024 * 1024
"""The large file of the cut: four times the faulty sshd's file size limit."""
FILE_LIMIT = 1024 * 1024


class LimitedSshd(Sshd):
    """An sshd whose processes may not write files above ``file_limit`` bytes."""

    file_limit: int | None = None

    def start(self) -> LimitedSshd:
        limit = self.file_limit

        def limits() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(self.config)], check=True, timeout=30)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=limits,
            )
        wait_port(self.port, what="sshd", alive=self.proc)
        return self


@pytest.fixture
def upload_key(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    key = tmp_path / "institute_upload"
    yield key, keygen(key)


def attempts(db: Path, difusor: str) -> list[tuple[int, str, str | None]]:
    """``(sequence, result, error)`` of every attempt to ``difusor``, in order."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        try:
            found = conn.execute(
                "SELECT sequence, result, error FROM delivery_attempt WHERE difusor = ? "
                "ORDER BY id",
                (difusor,),
            )
            return [(int(s), str(r), e) for s, r, e in found]
        except sqlite3.OperationalError:  # tables not created yet
            return []


def board_error(db: Path, difusor: str) -> object:
    """The delivery error the dashboard shows for ``difusor``."""
    records = DeliveryLog(db)
    try:
        return target_summary(records.target(difusor))["delivery_error"]
    finally:
        records.close()


def test_a_connection_dropped_mid_file_is_retried_to_the_complete_cut(
    tmp_path: Path, upload_key: tuple[Path, str]
) -> None:
    key, public = upload_key
    institute = Institute(tmp_path / "institute")
    healthy_server = Sshd(tmp_path / "sshd-sano", [public]).start()
    faulty = LimitedSshd(tmp_path / "sshd-corta", [public])
    agent_conf = make_config(tmp_path / "agent", institute)
    agent = AgentDaemon(tmp_path / "agent" / "prep-agent.conf")
    try:
        faulty.start()
        agent.start(timeout=20)
        healthy = Target(
            "sano",
            tmp_path / "sano",
            port=healthy_server.port,
            host_key=healthy_server.known_hosts_line(),
            identity=key,
        )
        healthy.inbox.mkdir()
        cutting = Target(
            "corta",
            agent_conf.inbox,
            port=faulty.port,
            host_key=faulty.known_hosts_line(),
            identity=key,
        )
        conf = write_config(
            tmp_path / "institute.conf",
            institute.allowed_signers,
            [healthy, cutting],
            retry_for=60,
            backoff_max=1,
        )
        db = tmp_path / "collector.sqlite"
        outbox = tmp_path / "out"
        first = make_cut(institute, outbox, 1, T0 + timedelta(minutes=1))
        run = [PREP_AGENT, "distribute", "--config", str(conf), "--no-confirm"]
        one = subprocess.run([*run, str(first.local)], capture_output=True, text=True, timeout=60)
        assert one.returncode == 0, one.stderr
        wait_for(lambda: agent.status().get("sequence") == 1, 20, "cut 1 published")
        # cut 2 adds a file four times the faulty target's limit
        big = bytes(range(256)) * (BIG // 256)
        at = T0 + timedelta(minutes=2)
        second = make_cut(
            institute, outbox, 2, at, {**institute.files(at, 2), "datos/big.bin": big}
        )
        faulty.file_limit = FILE_LIMIT
        faulty.stop()
        faulty.start()
        started = time.monotonic()
        proc = subprocess.Popen(
            [*run, str(second.local)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_for(
                lambda: any(r == "failed" for _, r, _ in attempts(db, "corta")),
                30,
                "the upload to be cut mid-file",
                alive=proc,
            )
            dropped = attempts(db, "corta")
            assert dropped[1:] == [(2, "failed", "connection lost during the upload")], dropped
            assert board_error(db, "corta") == "connection lost during the upload"
            partial = cutting.inbox / "datos" / "big.bin"
            assert 0 < partial.stat().st_size <= FILE_LIMIT < BIG
            assert (cutting.inbox / SIGNATURE_NAME).read_bytes() == first.signature
            # the healthy target is not held back: one attempt, delivered
            wait_for(lambda: len(attempts(db, "sano")) == 2, 10, "cut 2 on the healthy target")
            assert attempts(db, "sano") == [(1, "delivered", None), (2, "delivered", None)]
            assert holds(healthy, second)
            faulty.file_limit = None  # the difusor's side recovers
            faulty.stop()
            faulty.start()
            out, err = proc.communicate(timeout=60)
        finally:
            stop_process(proc)
        took = time.monotonic() - started
        assert proc.returncode == 0, out + err
        assert holds(cutting, second)
        assert attempts(db, "corta")[-1] == (2, "delivered", None)
        assert board_error(db, "corta") is None
        wait_for(lambda: agent.status().get("sequence") == 2, 20, "cut 2 published")
        events = [e["event"] for e in agent.journal()]
        assert "cut-rejected" not in events, events
        current = tmp_path / "agent" / "root" / "current"
        assert tree_digest(current)["datos/big.bin"] == second.expected_tree()["datos/big.bin"]
        assert took < 30, f"{took:.1f} s"
    finally:
        agent.stop()
        faulty.stop()
        healthy_server.stop()
