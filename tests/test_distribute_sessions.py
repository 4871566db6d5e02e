"""How ``prep-agent distribute`` shares the machine among targets (real sshd/sftp).

A target that does not answer waits out its connect timeout without holding
one of the ``workers`` transfer slots; a target that must receive many files
gets them in several sftp sessions at once over its one connection, and the
signature only after every one of them has succeeded.
"""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME
from tests.distkit import BlackHole, Sshd, Target, distribute, write_config
from tests.kit import OFFSET, Institute, keygen
from tests.sftpkit import Cut, make_cut

T0 = datetime.now(OFFSET).replace(microsecond=0) - timedelta(hours=1)
MANY = 450
"""Files of the big cut: more than two sessions' worth (200 files each)."""


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[Sshd, Path]]:
    upload_key = tmp_path / "institute_upload"
    server = Sshd(tmp_path / "sshd", [keygen(upload_key)]).start()
    try:
        yield server, upload_key
    finally:
        server.stop()


def target(tmp_path: Path, server: Sshd, key: Path, sid: str, **values: object) -> Target:
    inbox = tmp_path / "targets" / sid
    inbox.mkdir(parents=True)
    settings: dict[str, object] = {
        "port": server.port,
        "host_key": server.known_hosts_line(),
        "identity": key,
    }
    settings.update(values)
    return Target(sid, inbox, **settings)  # type: ignore[arg-type]


def attempts(tmp_path: Path) -> list[tuple[str, float, float, str, str | None]]:
    with sqlite3.connect(tmp_path / "collector.sqlite") as db:
        query = "SELECT difusor, started, ended, result, error FROM delivery_attempt ORDER BY id"
        return list(db.execute(query))


def big_cut(institute: Institute, outbox: Path, sequence: int) -> Cut:
    when = T0 + timedelta(minutes=sequence)
    files = institute.files(when, sequence)
    for i in range(MANY):
        files[f"actas/{i // 50:02d}/acta-{i:04d}.txt"] = f"acta {i} corte {sequence}\n".encode()
    return make_cut(institute, outbox, sequence, when, files)


def sftp_sessions(server: Sshd) -> int:
    """How many sftp sessions the server started (its VERBOSE log)."""
    text = server.log.read_text(errors="replace")
    return text.count("subsystem 'sftp'")


def test_a_black_holed_target_holds_no_transfer_slot(
    tmp_path: Path, sshd: tuple[Sshd, Path]
) -> None:
    server, key = sshd
    institute = Institute(tmp_path / "institute")
    healthy = [target(tmp_path, server, key, f"sano-{i}") for i in range(2)]
    with BlackHole(3) as hole:
        dark = target(tmp_path, server, key, "sin-respuesta", host=hole.address)
        # One slot, and the dead target first in the config: it is tried first.
        conf = write_config(
            tmp_path / "institute.conf",
            institute.allowed_signers,
            [dark, *healthy],
            workers=1,
            connect_timeout=4,
            retry_for=1,
        )
        cut = make_cut(institute, tmp_path / "out", 1, T0 + timedelta(minutes=1))
        proc = distribute(conf, "--no-confirm", str(cut.local))
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "prep-agent: sin-respuesta: cut 1: connection timed out"
    rows = attempts(tmp_path)
    first = min(started for _, started, _, _, _ in rows)
    dark_rows = [r for r in rows if r[0] == "sin-respuesta"]
    assert dark_rows and dark_rows[0][2] - dark_rows[0][1] >= 3.5  # it did wait its timeout
    done = [ended for sid, _, ended, result, _ in rows if result == "delivered"]
    assert len(done) == 2
    # Both healthy targets held the cut while the dead one was still connecting.
    assert max(done) - first < 3


def test_many_files_go_in_several_sessions_and_the_signature_last(
    tmp_path: Path, sshd: tuple[Sshd, Path]
) -> None:
    server, key = sshd
    institute = Institute(tmp_path / "institute")
    one = target(tmp_path, server, key, "uno")
    conf = write_config(tmp_path / "institute.conf", institute.allowed_signers, [one])
    before = sftp_sessions(server)
    cut = big_cut(institute, tmp_path / "out", 1)
    proc = distribute(conf, "--no-confirm", str(cut.local))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for rel, data in cut.files.items():
        assert (one.inbox / rel).read_bytes() == data, rel
    assert (one.inbox / MANIFEST_NAME).read_bytes() == cut.manifest
    assert (one.inbox / SIGNATURE_NAME).read_bytes() == cut.signature
    # 3 batches of files at once, then the one with the manifest and the signature.
    assert sftp_sessions(server) - before == 4
    signed = (one.inbox / SIGNATURE_NAME).stat().st_mtime_ns
    newest = max((one.inbox / rel).stat().st_mtime_ns for rel in [*cut.files, MANIFEST_NAME])
    assert signed >= newest


def test_a_failed_session_stops_the_others_and_nothing_is_signed(
    tmp_path: Path, sshd: tuple[Sshd, Path]
) -> None:
    server, key = sshd
    institute = Institute(tmp_path / "institute")
    one = target(tmp_path, server, key, "uno")
    conf = write_config(
        tmp_path / "institute.conf", institute.allowed_signers, [one], retry_for=0.5
    )
    stuck = one.inbox / "actas" / "08"  # in the last of the 3 batches
    stuck.mkdir(parents=True)
    subprocess.run(["chattr", "+i", str(stuck)], check=True)
    try:
        cut = big_cut(institute, tmp_path / "out", 1)
        proc = distribute(conf, "--no-confirm", str(cut.local))
    finally:
        subprocess.run(["chattr", "-i", str(stuck)], check=False)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert not (one.inbox / SIGNATURE_NAME).exists()
    assert not (one.inbox / MANIFEST_NAME).exists()
    (row,) = attempts(tmp_path)
    assert row[3] == "failed" and row[4] is not None and "\n" not in row[4]
