"""``prep-agent distribute`` faults on real sshd/sftp: a connection that dies
mid-file, a cut folder that changes while it is being distributed (the store
of verified bytes it is sent from: ``test_distribute_store.py``), a recovered
target that gets the newest cut, not the backlog, and a one-shot run stopped
with Ctrl-C; the progress line on a terminal and the one-line events elsewhere.

The mid-file drop is made deterministic with a limit: the target's sshd runs
with ``RLIMIT_FSIZE`` below the size of a file of the cut, so the session
process that writes it is killed by ``SIGXFSZ`` at that offset and the
connection closes under the client, every time. The target "recovers" when
its sshd is restarted without the limit (same port, same host key); its old
connection process, still limited, outlives the restart, so the retry must
open a new connection rather than reuse the multiplexed one.
"""

from __future__ import annotations

import contextlib
import os
import pty
import re
import resource
import select
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME
from prep_agent.institute.collector.deliveries import (
    DELIVERED,
    FAILED,
    DeliveryLog,
    target_summary,
)
from prep_agent.institute.distribution.command import Progress
from prep_agent.institute.distribution.scheduler import Event
from tests.distkit import BlackHole, Sshd, Target, write_config
from tests.kit import (
    PREP_AGENT,
    AgentDaemon,
    Institute,
    ctrl_c_reaches,
    free_port,
    keygen,
    make_config,
    stop_process,
    tree_digest,
    wait_for,
    wait_port,
)
from tests.sftpkit import Cut, make_cut
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


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.isdigit():
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def crash(server: Sshd) -> None:
    """Stop ``server`` with every connection it serves, as a host that goes down
    (a stopped sshd leaves its connections running)."""
    if server.proc is None:
        return
    sessions = descendants(server.proc.pid)
    server.stop()
    for pid in sessions:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


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
        crash(faulty)
        crash(healthy_server)


@pytest.fixture
def sshd(tmp_path: Path, upload_key: tuple[Path, str]) -> Iterator[Sshd]:
    server = Sshd(tmp_path / "sshd", [upload_key[1]]).start()
    try:
        yield server
    finally:
        crash(server)


def test_a_cut_folder_changed_while_distributed_sends_only_the_verified_bytes(
    tmp_path: Path, upload_key: tuple[Path, str], sshd: Sshd
) -> None:
    key = upload_key[0]
    institute = Institute(tmp_path / "institute")
    common = {"port": sshd.port, "host_key": sshd.known_hosts_line(), "identity": key}
    healthy = Target("sano", tmp_path / "sano", **common)  # type: ignore[arg-type]
    healthy.inbox.mkdir()
    late = Target("tarde", tmp_path / "tarde", **common)  # type: ignore[arg-type]
    conf = write_config(
        tmp_path / "institute.conf",
        institute.allowed_signers,
        [healthy, late],
        retry_for=60,
        backoff_max=1,
    )
    db = tmp_path / "collector.sqlite"
    cut = make_cut(institute, tmp_path / "out", 1, T0 + timedelta(minutes=1))
    proc = subprocess.Popen(
        [PREP_AGENT, "distribute", "--config", str(conf), "--no-confirm", str(cut.local)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: attempts(db, "sano") and attempts(db, "tarde"),
            30,
            "one attempt on each target",
            alive=proc,
        )
        assert attempts(db, "tarde")[0][1:] == ("failed", "remote folder missing")
        # after the check and the first target, the PREP system rewrites its folder:
        # a listed file in place, the manifest, and a file the manifest does not list
        with open(cut.local / "index.html", "r+b") as fh:
            fh.write(b"<h1>Otro</h1>")
        (cut.local / MANIFEST_NAME).write_bytes(cut.manifest + b"\n")
        (cut.local / "extra.html").write_bytes(b"<p>no firmado</p>")
        late.inbox.mkdir()  # the late target becomes reachable
        out, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc)
    assert proc.returncode == 0, out + err
    assert attempts(db, "tarde")[-1] == (1, "delivered", None)
    assert holds(late, cut), "the late target got bytes the institute did not verify"
    assert holds(healthy, cut)
    assert not (late.inbox / "extra.html").exists()
    # sftp gives an upload its local mode: the next cut must be able to overwrite it
    assert all((late.inbox / rel).stat().st_mode & 0o200 for rel in cut.files)


EVENT_LINE = re.compile(
    r"(delivered|failed|superseded|published|unconfirmed) cut \d+ \S+ \d+\.\d\d s(: .+)?"
)
"""One event, one line: what the command writes when its output is not a terminal."""


def on_terminal(command: list[str], timeout: float = 60) -> tuple[int, str, str]:
    """Run ``command`` with its stdout on a pseudo-terminal; its exit code, what
    the terminal received and its stderr."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, text=True
    )
    os.close(slave)
    received = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not data:
                break
            received += data
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(master)
        stop_process(proc)
    return proc.returncode, received.decode(), err


def test_progress_line_on_a_terminal_and_one_line_per_event_otherwise(
    tmp_path: Path, upload_key: tuple[Path, str], sshd: Sshd
) -> None:
    key = upload_key[0]
    institute = Institute(tmp_path / "institute")
    common = {"port": sshd.port, "host_key": sshd.known_hosts_line(), "identity": key}
    healthy = [Target(f"sano-{i}", tmp_path / f"sano-{i}", **common) for i in range(3)]  # type: ignore[arg-type]
    for target in healthy:
        target.inbox.mkdir()
    refused = Target("cerrado", tmp_path / "cerrado", **{**common, "port": free_port()})  # type: ignore[arg-type]
    conf = write_config(
        tmp_path / "institute.conf", institute.allowed_signers, [*healthy, refused], retry_for=2
    )
    run = [PREP_AGENT, "distribute", "--config", str(conf), "--no-confirm"]
    first = make_cut(institute, tmp_path / "out", 1, T0 + timedelta(minutes=1))
    code, screen, err = on_terminal([*run, str(first.local)])
    assert code == 5, screen + err
    assert err.strip() == "prep-agent: cerrado: cut 1: connection refused"
    # one line, redrawn in place, that ends with every healthy target done
    assert "\r" in screen.replace("\r\n", "\n"), screen
    shown = [ln.split("\r")[-1].replace("\x1b[K", "") for ln in screen.split("\r\n")]
    assert shown[-2:] == ["cut 1: 3/4 targets hold it", ""], shown
    final = shown[-3]
    assert re.fullmatch(r"cut 1: 3/4 targets, 1 failing, slowest sano-\d \d+\.\d s", final), final
    assert "delivered cut 1" not in screen  # the line counts them, no line each
    failures = [ln for ln in shown if ln.startswith("failed cut 1 cerrado")]
    assert failures and all(ln.endswith(": connection refused") for ln in failures), shown
    # not a terminal (systemd, a pipe): one plain line per event, no redrawing
    at = T0 + timedelta(minutes=2)
    second = make_cut(institute, tmp_path / "out", 2, at, institute.files(at, 2))
    proc = subprocess.run(
        [*run, str(second.local)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout
    *events, summary = proc.stdout.splitlines()
    assert summary == "cut 2: 3/4 targets hold it"
    assert all(EVENT_LINE.fullmatch(ln) for ln in events), events
    delivered = sorted(ln.split()[3] for ln in events if ln.startswith("delivered"))
    assert delivered == ["sano-0", "sano-1", "sano-2"]
    assert any(ln.startswith("failed cut 2 cerrado") for ln in events)


def test_a_recovered_target_gets_the_newest_cut_not_the_backlog(
    tmp_path: Path, upload_key: tuple[Path, str], sshd: Sshd
) -> None:
    key, public = upload_key
    institute = Institute(tmp_path / "institute")
    down = Sshd(tmp_path / "sshd-caido", [public]).start()
    agent_conf = make_config(tmp_path / "agent", institute)
    agent = AgentDaemon(tmp_path / "agent" / "prep-agent.conf")
    healthy = Target(
        "sano", tmp_path / "sano", port=sshd.port, host_key=sshd.known_hosts_line(), identity=key
    )
    healthy.inbox.mkdir()
    fallen = Target(
        "caido", agent_conf.inbox, port=down.port, host_key=down.known_hosts_line(), identity=key
    )
    conf = write_config(
        tmp_path / "institute.conf",
        institute.allowed_signers,
        [healthy, fallen],
        retry_for=60,
        backoff_max=1,
    )
    db = tmp_path / "collector.sqlite"
    outbox, staging = tmp_path / "salida", tmp_path / "staging"
    outbox.mkdir()
    cuts: dict[int, Cut] = {}

    def publish(sequence: int) -> None:
        at = T0 + timedelta(minutes=sequence)
        cut = make_cut(institute, staging, sequence, at, institute.files(at, sequence))
        os.rename(cut.local, outbox / f"{sequence:06d}")
        cuts[sequence] = cut

    def tried(difusor: str, sequence: int, result: str) -> bool:
        return (sequence, result) in [(s, r) for s, r, _ in attempts(db, difusor)]

    watch = subprocess.Popen(
        [PREP_AGENT, "distribute", "--config", str(conf), "--no-confirm", "--watch", str(outbox)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        agent.start(timeout=20)
        publish(1)
        wait_for(lambda: tried("caido", 1, "delivered"), 20, "cut 1 on both", alive=watch)
        wait_for(lambda: agent.status().get("sequence") == 1, 20, "cut 1 published")
        crash(down)  # the difusor's server goes down for two cuts
        for sequence in (2, 3):
            publish(sequence)
            wait_for(
                lambda n=sequence: tried("caido", n, "failed") and tried("sano", n, "delivered"),  # type: ignore[misc]
                20,
                f"cut {sequence}: delivered to the healthy target, failing on the fallen one",
                alive=watch,
            )
        down.start()  # it recovers
        wait_for(lambda: tried("caido", 3, "delivered"), 20, "cut 3 on the recovered target")
        wait_for(lambda: agent.status().get("sequence") == 3, 20, "cut 3 published")
    finally:
        watch.send_signal(signal.SIGTERM)
        try:
            out, _ = watch.communicate(timeout=20)
        finally:
            stop_process(watch)
            agent.stop()
            crash(down)
    assert watch.returncode == 0, out
    fallen_attempts = attempts(db, "caido")
    assert not tried("caido", 2, "delivered"), fallen_attempts
    assert fallen_attempts[-1] == (3, "delivered", None)
    assert holds(fallen, cuts[3])
    published = [e["sequence"] for e in agent.journal() if e["event"] == "cut-published"]
    assert published == [1, 3], "the agent saw the backlog"
    with sqlite3.connect(db) as conn:
        (files,) = conn.execute(
            "SELECT files FROM delivery_attempt WHERE difusor = 'caido' AND sequence = 3 "
            "AND result = 'delivered'"
        ).fetchone()
    changed = [p for p in cuts[3].files if cuts[3].files[p] != cuts[1].files[p]]
    assert files == len(changed) < len(cuts[3].files), "only what cut 1 did not have"


def test_an_interrupted_one_shot_run_stops_at_once_and_says_who_lacks_the_cut(
    tmp_path: Path, upload_key: tuple[Path, str], sshd: Sshd
) -> None:
    key = upload_key[0]
    institute = Institute(tmp_path / "institute")
    common = {"port": sshd.port, "host_key": sshd.known_hosts_line(), "identity": key}
    healthy = Target("sano", tmp_path / "sano", **common)  # type: ignore[arg-type]
    healthy.inbox.mkdir()
    db = tmp_path / "collector.sqlite"
    cut = make_cut(institute, tmp_path / "out", 1, T0 + timedelta(minutes=1))
    with BlackHole(3) as hole:
        dark = Target("sin-respuesta", tmp_path / "dark", **{**common, "host": hole.address})  # type: ignore[arg-type]
        conf = write_config(
            tmp_path / "institute.conf",
            institute.allowed_signers,
            [healthy, dark],
            connect_timeout=30,
            retry_for=120,
        )
        proc = subprocess.Popen(
            [PREP_AGENT, "distribute", "--config", str(conf), "--no-confirm", str(cut.local)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=ctrl_c_reaches,
        )
        try:
            wait_for(lambda: attempts(db, "sano"), 30, "the healthy target", alive=proc)
            proc.send_signal(signal.SIGINT)  # the operator's Ctrl-C, the dark target connecting
            started = time.monotonic()
            out, err = proc.communicate(timeout=15)
            took = time.monotonic() - started
        finally:
            stop_process(proc)
    assert proc.returncode == 5, out + err
    stopped = "stopped before the upload ended (distribute was stopped)"
    assert err.strip() == f"prep-agent: sin-respuesta: cut 1: {stopped}"
    assert attempts(db, "sin-respuesta") == [(1, "superseded", stopped)]
    assert holds(healthy, cut)
    assert took < 5, f"{took:.1f} s to stop"


@pytest.mark.core
def test_each_cut_gets_its_own_progress_line_on_a_terminal() -> None:
    master, slave = pty.openpty()
    with open(slave, "w", encoding="utf-8", closefd=True) as terminal:
        progress = Progress(2, terminal)
        assert progress.tty
        progress(Event(DELIVERED, "diario-a", 1, 0.4))
        progress(Event(FAILED, "diario-b", 1, 0.1, "connection refused"))
        progress(Event(DELIVERED, "diario-a", 2, 0.3))  # --watch: the next cut
        progress(Event(DELIVERED, "diario-b", 2, 0.9))
    screen = b""
    while select.select([master], [], [], 0.5)[0]:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        screen += data
    os.close(master)
    shown = [ln.split("\r")[-1].replace("\x1b[K", "") for ln in screen.decode().split("\r\n")]
    assert shown == [
        "failed cut 1 diario-b 0.10 s: connection refused",
        "cut 1: 1/2 targets, 1 failing, slowest diario-a 0.4 s",
        "cut 2: 2/2 targets, slowest diario-b 0.9 s",
    ], shown
