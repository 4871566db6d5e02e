"""``prep-agent distribute`` against real sshd/sftp targets on loopback.

Each test starts its own sshd; targets are folders it serves. Cuts are signed
with the real ``ssh-keygen`` (the kit's institute). Faults are real: a closed
port, a pinned key that is not the server's, a key the server does not
authorize, a missing or immutable folder, a full tmpfs, a black-holed address.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests

from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME
from tests.distkit import BlackHole, Sshd, Target, distribute, write_config
from tests.kit import OFFSET, PREP_AGENT, Daemon, Institute, free_port, keygen, wait_for
from tests.sftpkit import Cut, make_cut

T0 = datetime.now(OFFSET).replace(microsecond=0) - timedelta(hours=1)


@dataclass
class World:
    tmp: Path
    institute: Institute
    sshd: Sshd
    upload_key: Path
    outbox: Path

    def target(self, service_id: str, **settings: object) -> Target:
        inbox = self.tmp / "targets" / service_id
        inbox.mkdir(parents=True)
        values: dict[str, object] = {
            "port": self.sshd.port,
            "host_key": self.sshd.known_hosts_line(),
            "identity": self.upload_key,
        }
        values.update(settings)
        return Target(service_id, inbox, **values)  # type: ignore[arg-type]

    def config(self, targets: list[Target], **distribute: object) -> Path:
        return write_config(
            self.tmp / "institute.conf", self.institute.allowed_signers, targets, **distribute
        )

    def cut(self, sequence: int, files: dict[str, bytes] | None = None) -> Cut:
        return make_cut(
            self.institute, self.outbox, sequence, T0 + timedelta(minutes=sequence), files
        )

    def attempts(self) -> list[dict[str, object]]:
        with sqlite3.connect(self.tmp / "collector.sqlite") as db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM delivery_attempt ORDER BY id")]


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    upload_key = tmp_path / "institute_upload"
    public = keygen(upload_key)
    sshd = Sshd(tmp_path / "sshd", [public]).start()
    try:
        yield World(tmp_path, Institute(tmp_path / "institute"), sshd, upload_key, tmp_path / "out")
    finally:
        sshd.stop()


def holds(target: Target, cut: Cut) -> bool:
    """The target's folder holds the cut's exact files, manifest and signature."""
    try:
        same = all((target.inbox / rel).read_bytes() == data for rel, data in cut.files.items())
        return (
            same
            and (target.inbox / MANIFEST_NAME).read_bytes() == cut.manifest
            and (target.inbox / SIGNATURE_NAME).read_bytes() == cut.signature
        )
    except OSError:
        return False


def test_delivers_every_target_and_then_only_changed_files(world: World) -> None:
    targets = [world.target(f"diario-{c}") for c in "abc"]
    conf = world.config(targets)
    first = world.cut(1)
    proc = distribute(conf, "--no-confirm", str(first.local))
    assert proc.returncode == 0, proc.stderr
    assert all(holds(t, first) for t in targets)
    assert "cut 1: 3/3 targets hold it" in proc.stdout
    files = dict(first.files)
    files["index.html"] = b"<h1>Corte 2</h1>"
    second = world.cut(2, files)
    dry = distribute(conf, "--dry-run", str(second.local))
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.count(": 1 of 3 files") == 3, dry.stdout
    proc = distribute(conf, "--no-confirm", str(second.local))
    assert proc.returncode == 0, proc.stderr
    assert all(holds(t, second) for t in targets)
    rows = world.attempts()
    assert [(r["sequence"], r["files"], r["result"]) for r in rows] == [(1, 3, "delivered")] * 3 + [
        (2, 1, "delivered")
    ] * 3
    assert all(r["bytes"] == len(files["index.html"]) for r in rows[3:])


def last_errors(world: World) -> dict[str, str]:
    return {str(r["difusor"]): str(r["error"]) for r in world.attempts() if r["error"]}


def test_faults_are_reported_and_never_block_healthy_targets(world: World) -> None:
    stranger = world.tmp / "stranger"
    keygen(stranger)
    wrong_host = world.tmp / "wrong_host"
    keygen(wrong_host)
    healthy = world.target("sano")
    refused = world.target("cerrado", port=free_port())
    wrong_key = world.target(
        "llave-ajena", host_key=f"x {(wrong_host.with_suffix('.pub')).read_text()}"
    )
    auth = world.target("sin-acceso", identity=stranger)
    missing = world.target("sin-carpeta")
    missing.inbox.rmdir()
    readonly = world.target("solo-lectura")
    full = world.target("lleno")
    subprocess.run(["chattr", "+i", str(readonly.inbox)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full.inbox)], check=True)
    try:
        targets = [healthy, refused, wrong_key, auth, missing, readonly, full]
        conf = world.config(targets, retry_for=1.5)  # a retry at 1 s, then given up
        files = {"index.html": b"<h1>Corte 1</h1>", "datos/grande.bin": bytes(range(256)) * 1024}
        first = world.cut(1, files)
        started = time.monotonic()
        proc = distribute(conf, "--no-confirm", str(first.local))
        took = time.monotonic() - started
        assert proc.returncode == 5, proc.stdout + proc.stderr
        assert holds(healthy, first)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 6, proc.stderr
        reasons = dict(line.removeprefix("prep-agent: ").split(": cut 1: ") for line in lines)
        assert reasons == {
            "cerrado": "connection refused",
            "llave-ajena": "host key does not match the pinned host_key (refused)",
            "sin-acceso": "authentication refused",
            "sin-carpeta": "remote folder missing",
            "solo-lectura": "remote folder not writable",
            "lleno": "remote write failed (disk full?)",
        }, proc.stderr
        assert took < 20, f"faults took {took:.1f} s"
        rows = world.attempts()
        ok = [r for r in rows if r["difusor"] == "sano"]
        assert [r["result"] for r in ok] == ["delivered"]
        assert float(ok[0]["ended"]) - float(ok[0]["started"]) < 3  # type: ignore[arg-type]
        # refused host key and login are not retried; the others are, with backoff
        counts = {sid: sum(1 for r in rows if r["difusor"] == sid) for sid in reasons}
        assert (counts["llave-ajena"], counts["sin-acceso"]) == (1, 1)
        assert counts["cerrado"] >= 2
        assert last_errors(world)["lleno"] == "remote write failed (disk full?)"
        # recovered targets receive the newest cut, not the backlog
        missing.inbox.mkdir()
        subprocess.run(["chattr", "-i", str(readonly.inbox)], check=True)
        second = world.cut(2, {**files, "index.html": b"<h1>Corte 2</h1>"})
        proc = distribute(conf, "--no-confirm", str(second.local))
        assert proc.returncode == 5
        assert all(holds(t, second) for t in (healthy, missing, readonly))
        sent = [r for r in world.attempts() if r["result"] == "delivered"]
        assert {(r["difusor"], r["sequence"]) for r in sent} == {
            ("sano", 1),
            ("sano", 2),
            ("sin-carpeta", 2),
            ("solo-lectura", 2),
        }
        assert [r["files"] for r in sent if r["difusor"] == "sano"] == [2, 1]
    finally:
        subprocess.run(["chattr", "-i", str(readonly.inbox)], check=False)
        subprocess.run(["umount", str(full.inbox)], check=False)


def test_a_cut_any_difusor_would_reject_never_leaves(world: World) -> None:
    target = world.target("diario-a")
    conf = world.config([target])
    unsigned = world.cut(5)
    (unsigned.local / SIGNATURE_NAME).unlink()
    proc = distribute(conf, str(unsigned.local))
    assert proc.returncode == 3, proc.stderr
    assert "incomplete: no prep-manifest.json.sig" in proc.stderr
    forger = Institute(world.tmp / "forger")
    forged = make_cut(forger, world.tmp / "forged", 5, T0 + timedelta(minutes=5))
    proc = distribute(conf, str(forged.local))
    assert proc.returncode == 3
    assert "signature-untrusted: signed by 0/1" in proc.stderr
    tampered = world.cut(6)
    (tampered.local / "index.html").write_bytes(b"<h1>otro</h1>")
    proc = distribute(conf, str(tampered.local))
    assert proc.returncode == 3
    assert "file-mismatch: index.html" in proc.stderr
    assert list(target.inbox.iterdir()) == []
    assert world.attempts() == []
    newer = world.cut(7)
    assert distribute(conf, "--no-confirm", str(newer.local)).returncode == 0
    older = world.cut(4)
    proc = distribute(conf, str(older.local))
    assert proc.returncode == 3
    assert "rollback: sequence 4 < accepted 7" in proc.stderr
    assert holds(target, newer)
    assert [r["sequence"] for r in world.attempts()] == [7]


def test_key_signs_here_and_the_same_cut_again_is_a_no_op(world: World) -> None:
    target = world.target("diario-a")
    conf = world.config([target])
    cut = world.cut(3)
    (cut.local / SIGNATURE_NAME).unlink()
    proc = distribute(conf, "--no-confirm", "--key", str(world.institute.key), str(cut.local))
    assert proc.returncode == 0, proc.stderr
    assert (target.inbox / SIGNATURE_NAME).read_bytes() == (cut.local / SIGNATURE_NAME).read_bytes()
    again = distribute(conf, "--no-confirm", str(cut.local))
    assert again.returncode == 0, again.stderr
    assert len(world.attempts()) == 1  # it already holds it: nothing sent


def test_a_black_holed_target_does_not_delay_the_others(world: World) -> None:
    healthy = [world.target(f"sano-{i}") for i in range(3)]
    with BlackHole() as hole:
        dark = world.target("sin-respuesta", host=hole.address)
        conf = world.config([*healthy, dark], connect_timeout=3, retry_for=2)
        cut = world.cut(1)
        proc = distribute(conf, "--no-confirm", str(cut.local))
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert proc.stderr.strip() == "prep-agent: sin-respuesta: cut 1: connection timed out"
    rows = world.attempts()
    dark_rows = [r for r in rows if r["difusor"] == "sin-respuesta"]
    assert dark_rows and all(r["result"] == "failed" for r in dark_rows)
    assert float(dark_rows[0]["ended"]) - float(dark_rows[0]["started"]) >= 2.5  # type: ignore[arg-type]
    done = [float(r["ended"]) for r in rows if r["result"] == "delivered"]  # type: ignore[arg-type]
    assert len(done) == 3 and all(holds(t, cut) for t in healthy)
    assert max(done) - float(dark_rows[0]["started"]) < 2  # type: ignore[arg-type]


def test_the_collector_shows_deliveries_and_the_good_standing_list(world: World) -> None:
    healthy = world.target("sano")
    refused = world.target("cerrado", port=free_port())
    conf = world.config([healthy, refused], retry_for=1)
    fresh = make_cut(world.institute, world.outbox, 1, datetime.now(OFFSET) - timedelta(minutes=1))
    assert distribute(conf, "--no-confirm", str(fresh.local)).returncode == 5
    port = free_port()
    text = conf.read_text().replace("[collector]\n", f"[collector]\nlisten = 127.0.0.1:{port}\n")
    conf.write_text(text)
    base = f"http://127.0.0.1:{port}"
    collector = Daemon(
        ["collector", "--config", str(conf)], world.tmp / "collector.log", livez=base + "/livez"
    )
    collector.start()
    try:
        rows = {
            r["service_id"]: r
            for r in requests.get(base + "/api/difusores", timeout=5).json()["difusores"]
        }
        assert rows["sano"]["delivered_sequence"] == 1
        assert isinstance(rows["sano"]["delivery_latency"], float)
        assert rows["sano"]["contact"] == "Mesa de sano, 844 000 0000"
        assert rows["cerrado"]["delivered_sequence"] is None
        assert rows["cerrado"]["delivery_error"] == "connection refused"
        assert rows["sano"]["latest_sequence"] == 1  # distribute recorded the signed cut
        page = requests.get(base + "/", timeout=5).text
        assert "última falla: connection refused" in page
        standing = requests.get(base + "/difusores-vigentes.json", timeout=5).json()
        assert {d["serviceId"] for d in standing["difusores"]} == {"sano", "cerrado"}
        fragment = requests.get(base + "/difusores-vigentes.html", timeout=5)
        assert fragment.text.startswith('<ul class="prep-difusores"')
    finally:
        collector.stop()


def test_threshold_two_signed_here_with_a_key_file_and_an_agent_key(world: World) -> None:
    second = world.tmp / "second_signer"
    public = keygen(second)
    signers = world.institute.allowed_signers
    signers.write_text(signers.read_text() + f'iec2 namespaces="prep-cut" {public}\n')
    target = world.target("diario-a")
    conf = world.config([target], threshold=2)
    cut = world.cut(1)
    (cut.local / SIGNATURE_NAME).unlink()
    one = distribute(conf, "--key", str(world.institute.key), str(cut.local))
    assert one.returncode == 3 and "signed by 1/2" in one.stderr, one.stderr
    socket = world.tmp / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL)
    try:
        wait_for(socket.exists, 10, "ssh-agent socket")
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket)}
        subprocess.run(["ssh-add", "-q", str(second)], env=env, check=True, capture_output=True)
        proc = subprocess.run(
            [
                *(PREP_AGENT, "distribute", "--config", str(conf), "--no-confirm"),
                *("--key", str(world.institute.key), "--agent", f"{second}.pub", str(cut.local)),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert (target.inbox / SIGNATURE_NAME).read_bytes().count(b"BEGIN SSH SIGNATURE") == 2
