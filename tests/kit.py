"""The one shared test kit: a fake institute, agent configs and real processes.

The institute makes, mutates and signs cuts with the real ssh-keygen: signing
goes through ``ssh-keygen -Y sign`` (not our own signer), so the agent is always
tested against signatures OpenSSH itself produced, and ``ssh_verify`` checks
what the agent published with ``ssh-keygen -Y verify``.

The agent is run as the real ``prep-agent`` command in its own process
(``AgentDaemon``; ``Daemon`` for the other long-running commands), observed from
outside (journal, ``/livez``, ``status_json``) and stopped with SIGTERM, then
SIGKILL (``stop_process``). ``wait_for`` is the one way to wait for something.
The other ``*kit`` modules build on this one.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

from prep_agent.agent.config import Config, load, render_template
from prep_agent.agent.journal import read_journal

SHARED = Path(__file__).resolve().parents[2] / "shared"
"""The read-only shared folder beside the project."""
PREP_AGENT = str(Path(sys.executable).parent / "prep-agent")
"""The installed command of the venv running the tests."""
OFFSET = timezone(timedelta(hours=-6))
ELECTION = "coah-ayun-2021"

T = TypeVar("T")
D = TypeVar("D", bound="Daemon")


def keygen(path: Path, key_type: str = "ed25519", bits: int | None = None) -> str:
    """Create an OpenSSH key pair with ssh-keygen; return the public key line."""
    cmd = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", path.name, "-f", str(path)]
    if bits:
        cmd += ["-b", str(bits)]
    subprocess.run(cmd, check=True)
    return Path(f"{path}.pub").read_text().strip()


def ssh_sign(key: Path, data: bytes, namespace: str = "prep-cut", hashalg: str = "sha512") -> bytes:
    """Sign ``data`` with ``ssh-keygen -Y sign``; return the armored signature."""
    proc = subprocess.run(
        [
            "ssh-keygen",
            "-Y",
            "sign",
            "-q",
            "-n",
            namespace,
            "-O",
            f"hashalg={hashalg}",
            "-f",
            str(key),
        ],
        input=data,
        capture_output=True,
        check=True,
    )
    return proc.stdout


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 15) -> int | None:
    """SIGTERM and wait (SIGKILL after ``timeout``); return the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    probe: Callable[[], T | None],
    timeout: float = 20.0,
    what: str = "",
    *,
    interval: float = 0.05,
    alive: subprocess.Popen[Any] | None = None,
    context: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns a true value, and return that value.

    Raises AssertionError after ``timeout`` seconds, or as soon as the process
    ``alive`` has exited while ``probe`` is still false; ``context()`` (a log
    tail, say) is added to the message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if alive is not None and alive.poll() is not None:
            value = probe()  # what it did just before exiting counts
            if value:
                return value
            problem = f"process exited ({alive.returncode}) while waiting for {what}"
        elif time.monotonic() > deadline:
            problem = f"not within {timeout} s: {what}"
        else:
            time.sleep(interval)
            continue
        raise AssertionError(problem + (f"\n{context()}" if context else ""))


def ssh_verify(
    allowed_signers: Path,
    sig: Path,
    data: bytes,
    principal: str = "iec",
    *,
    options: Sequence[str] = (),
    tz: str = "UTC",
    check: bool = True,
) -> int:
    """Check ``sig`` over ``data`` with the real ``ssh-keygen -Y verify``; return its exit status.

    ``options`` are ``-O`` options (``verify-time=...``); ssh-keygen runs in a
    clean environment in ``tz``. Raises AssertionError, with ssh-keygen's output,
    if it refuses the signature and ``check`` is set.
    """
    args = ["ssh-keygen", "-Y", "verify", "-f", str(allowed_signers), "-I", principal]
    args += ["-n", "prep-cut", "-s", str(sig)]
    for option in options:
        args += ["-O", option]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(sig.parent), "LC_ALL": "C", "TZ": tz}
    done = subprocess.run(args, input=data, capture_output=True, env=env, check=False)
    if check:
        assert done.returncode == 0, f"ssh-keygen -Y verify refused {sig}: {done.stderr!r}"
    return done.returncode


def minute_ago(minutes: int = 1) -> datetime:
    """A cut time safely in the past, at a whole minute, in UTC-6."""
    return (datetime.now(OFFSET) - timedelta(minutes=minutes)).replace(second=0, microsecond=0)


def csv_bytes(cut_time: datetime, rows: int = 3) -> bytes:
    """A PREP-format CSV whose line 2 stamps ``cut_time``."""
    stamp = cut_time.strftime("%d/%m/%Y %H:%M") + " (UTC-6)"
    body = "".join(f"{i},05,AYUNTAMIENTO,{i * 7}\r\n" for i in range(rows))
    return f"AYUNTAMIENTOS 2021\r\n{stamp}\r\nCLAVE,ESTADO,TIPO,VOTOS\r\n{body}".encode()


class Institute:
    """Makes signed cuts into a folder, as the institute would upload them."""

    def __init__(self, home: Path, key_type: str = "ed25519", bits: int | None = None) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        self.key = home / f"institute_{key_type}"
        self.public = keygen(self.key, key_type, bits)
        self.allowed_signers = home / "allowed_signers"
        self.allowed_signers.write_text(f'iec namespaces="prep-cut" {self.public}\n')

    def files(self, cut_time: datetime, sequence: int) -> dict[str, bytes]:
        """The default publication of a cut: a page, a CSV, a shared logo."""
        return {
            "index.html": f"<h1>Corte {sequence}</h1>".encode(),
            "datos/COAH_AYUN_2021.csv": csv_bytes(cut_time, sequence),
            "img/logo.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
        }

    def manifest(
        self, files: dict[str, bytes], sequence: int, cut_time: datetime, **extra: Any
    ) -> dict[str, Any]:
        """A valid manifest document for ``files``; ``extra`` overrides keys."""
        doc: dict[str, Any] = {
            "format": "prep-cut/1",
            "election": ELECTION,
            "sequence": sequence,
            "cut_time": cut_time.isoformat(),
            "signed_at": (cut_time + timedelta(seconds=30)).isoformat(),
            "entry": "index.html",
            "files": [
                {"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                for p, b in sorted(files.items())
            ],
        }
        doc.update(extra)
        return doc

    def deliver(
        self,
        inbox: Path,
        files: dict[str, bytes],
        doc: dict[str, Any] | None = None,
        raw: bytes | None = None,
        sig: bytes | None = None,
        key: Path | None = None,
    ) -> bytes:
        """Write files, the manifest and last its signature into ``inbox``."""
        for rel, data in files.items():
            target = inbox / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        data = raw if raw is not None else json.dumps(doc, indent=1).encode()
        (inbox / "prep-manifest.json").write_bytes(data)
        signature = sig if sig is not None else ssh_sign(key or self.key, data)
        tmp = inbox / ".sig.part"
        tmp.write_bytes(signature)
        os.replace(tmp, inbox / "prep-manifest.json.sig")
        return data

    def cut(
        self, inbox: Path, sequence: int, cut_time: datetime | None = None, **extra: Any
    ) -> bytes:
        """Deliver a complete valid cut; return its manifest bytes."""
        when = cut_time or minute_ago(60 - sequence)
        files = self.files(when, sequence)
        return self.deliver(inbox, files, self.manifest(files, sequence, when, **extra))


def make_config(tmp: Path, institute: Institute, **settings: Any) -> Config:
    """Write an agent config under ``tmp`` (``settings`` replace template lines)."""
    text = render_template(
        election=ELECTION,
        root=tmp / "root",
        inbox=tmp / "inbox",
        trust=institute.allowed_signers,
        threshold=settings.pop("threshold", 1),
        listen="127.0.0.1:0",
    )
    for key, value in settings.items():
        lines = text.splitlines()
        lines = [f"{key} = {value}" if ln.startswith(f"{key} =") else ln for ln in lines]
        text = "\n".join(lines) + "\n"
    (tmp / "inbox").mkdir(parents=True, exist_ok=True)
    path = tmp / "prep-agent.conf"
    path.write_text(text)
    return load(path)


def tree_digest(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (following ``current``)."""
    base = Path(os.path.realpath(folder))
    return {
        p.relative_to(base).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


# --- real prep-agent processes ------------------------------------------------------

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""An opener that never goes through a proxy from the environment."""


def wait_port(
    port: int, timeout: float = 15.0, what: str = "", alive: subprocess.Popen[Any] | None = None
) -> None:
    """Wait until something accepts TCP connections on 127.0.0.1:``port``.

    Raises AssertionError after ``timeout`` seconds, or when ``alive`` exits first.
    """

    def accepts() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return False
        return True

    wait_for(accepts, timeout, f"{what or 'a server'} to listen on {port}", alive=alive)


def answers(url: str, timeout: float = 2.0) -> bool:
    """Whether a GET of ``url`` answers 200 (refused, other statuses: no)."""
    try:
        with _DIRECT.open(url, timeout=timeout) as response:
            return int(response.status) == 200
    except (OSError, http.client.HTTPException):
        return False


def status_json(conf: Path, command: Sequence[str] = (PREP_AGENT,)) -> dict[str, Any]:
    """``prep-agent status --json`` of the real command, parsed.

    Raises AssertionError, with its error output, unless it exits 0.
    """
    proc = subprocess.run(
        [*command, "status", "--json", "--config", str(conf)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


class Daemon:
    """A long-running ``prep-agent`` command (``run``, ``collector``) in its own process.

    Its output is appended to ``log``: an undrained pipe fills up after some 80
    cuts and blocks the process. ``start`` waits until ``ready()``; ``stop`` is
    SIGTERM, then SIGKILL.
    """

    def __init__(
        self,
        args: Sequence[str],
        log: Path,
        *,
        livez: str | None = None,
        command: Sequence[str] = (PREP_AGENT,),
    ) -> None:
        self.command = list(command)
        self.argv = [*command, *args]
        self.log = log
        self.livez = livez
        """A URL that answers 200 once it serves (None: ready once started)."""
        self.proc: subprocess.Popen[bytes] | None = None

    def _starting(self) -> None:
        """Called just before each start (to note where its journal ends)."""

    def spawn(self: D) -> D:
        """Start the process, without waiting for it to be ready."""
        self._starting()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def ready(self) -> bool:
        """Whether it serves: its ``livez`` URL answers 200."""
        return self.livez is None or answers(self.livez)

    def start(self: D, timeout: float = 15.0) -> D:
        """Start the process and wait until it is ready.

        Raises AssertionError, with the end of its log, if it exits first or is
        not ready within ``timeout`` seconds (it is stopped then).
        """
        self.spawn()
        what = " ".join(["prep-agent", *self.argv[len(self.command) :]]) + " to be ready"
        try:
            wait_for(self.ready, timeout, what, alive=self.proc, context=self.output)
        except AssertionError:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM, without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); return the exit status."""
        return stop_process(self.proc, timeout)

    def kill(self, timeout: float = 30.0) -> int | None:
        """SIGKILL (if still running) and wait; return the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(timeout=timeout)

    def output(self, tail: int = 4000) -> str:
        """The end of its log."""
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""


class AgentDaemon(Daemon):
    """``prep-agent run --config CONF`` in its own process, observed from outside.

    Ready means: its ``agent-started`` journal event is written (the watcher
    runs; the web server was started before it) and ``/livez`` answers on the
    address of its ``server-listening`` event, so ``listen = 127.0.0.1:0`` works.
    """

    def __init__(
        self,
        conf: Path,
        log: Path | None = None,
        *,
        options: Sequence[str] = (),
        once: bool = False,
        command: Sequence[str] = (PREP_AGENT,),
    ) -> None:
        args = [*options, "run", "--config", str(conf), *(["--once"] if once else [])]
        super().__init__(args, conf.parent / "agent.log" if log is None else log, command=command)
        self.conf = conf
        self.config = load(conf)
        self.started: dict[str, Any] = {}
        """The ``agent-started`` event of the last start (empty until then)."""
        self.address: str | None = None
        """``host:port`` it listens on, from its ``server-listening`` event."""
        self._mark = 0

    def journal(self) -> list[dict[str, Any]]:
        """Every event of its journal so far."""
        return list(read_journal(self.config.journal_file))

    def _starting(self) -> None:
        self._mark = len(self.journal())
        self.started, self.address = {}, None

    def ready(self) -> bool:
        """Whether this start's ``agent-started`` is journaled and ``/livez`` answers."""
        if not self.started:
            events = self.journal()[self._mark :]
            started = [e for e in events if e["event"] == "agent-started"]
            if not started:
                return False
            listening = [e for e in events if e["event"] == "server-listening"]
            self.address = str(listening[-1]["address"]) if listening else None
            self.started = started[0]
        return self.address is None or answers(f"http://{self.address}/livez")

    def status(self) -> dict[str, Any]:
        """``prep-agent status --json`` for its config."""
        return status_json(self.conf, self.command)
