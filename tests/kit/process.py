"""Real ``prep-agent`` processes for tests, and the one way to wait for something.

The agent runs as the real ``prep-agent`` command in its own process
(``AgentDaemon``; ``Daemon`` for the other long-running commands), is observed
from outside (journal, ``/livez``, ``status_json``) and is stopped with SIGTERM,
then SIGKILL (``stop_process``).
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, TypeVar

from prep_agent.agent.config import load
from prep_agent.agent.journal import read_journal

PREP_AGENT = str(Path(sys.executable).parent / "prep-agent")
"""The installed command of the venv running the tests."""

T = TypeVar("T")
D = TypeVar("D", bound="Daemon")


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


def ctrl_c_reaches() -> None:
    """``preexec_fn`` for a child the test will stop with SIGINT (the operator's
    Ctrl-C): SIGINT back to its default there, so Python turns it into
    KeyboardInterrupt even when this run was started with SIGINT ignored (a
    background job of a non-interactive shell inherits SIG_IGN, and Python keeps it).
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
