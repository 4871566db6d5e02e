"""One target's OpenSSH link: the pinned host key, multiplexing, ``sftp -b``.

Every target gets a known_hosts file of its own holding only its pinned key,
under a ``HostKeyAlias``, with ``StrictHostKeyChecking=yes``: a mismatch is
refused, never learned. ``ControlMaster=auto`` with ``ControlPersist`` keeps
one connection per target across cuts. The batch uploads only the files the
target does not hold yet, then the manifest, and the signature last under a
temporary name renamed into place (prep-cut-v1 §1.2).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from prep_agent.core.errors import Error
from prep_agent.institute.collector.config import DifusorEntry, SftpTarget

CONTROL_PERSIST = 900
"""Seconds an idle multiplexed connection stays open (longer than a cut period)."""
POLL = 0.05
"""Seconds between checks of a running sftp for cancellation."""
CONNECTION_LOST = "connection lost during the upload"
"""The reason when the connection, or the sftp session on it, closed mid-batch."""


class DeliveryError(Error):
    """One target's upload failed; the message is its one-line reason."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Cancelled(Error):
    """The upload was stopped because a newer cut superseded it."""


@dataclass(frozen=True)
class Link:
    """How to reach one target."""

    service_id: str
    target: SftpTarget
    identity: Path | None
    known_hosts: Path
    control_path: str
    connect_timeout: float

    @property
    def alias(self) -> str:
        """The name its pinned key is filed under (``HostKeyAlias``)."""
        return f"prep-difusor-{self.service_id}"


def _control_dir() -> Path:
    """A private folder for the multiplexing sockets (short paths: sun_path is 108 bytes)."""
    folder = Path(tempfile.gettempdir()) / f"prep-distribute-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise Error(f"{folder} is not a private folder of this user")
    return folder


def make_link(entry: DifusorEntry, state: Path, connect_timeout: float) -> Link:
    """Write the target's known_hosts file (its pinned key only) and return its link.

    Raises ``Error`` when the entry has no sftp target or host key.
    """
    if entry.sftp is None or entry.host_key is None:
        raise Error(f"[difusor:{entry.service_id}] has no sftp target and host_key")
    folder = state / "known_hosts"
    folder.mkdir(parents=True, exist_ok=True)
    link = Link(
        service_id=entry.service_id,
        target=entry.sftp,
        identity=entry.identity,
        known_hosts=folder / entry.service_id,
        control_path="",
        connect_timeout=connect_timeout,
    )
    tmp = link.known_hosts.with_suffix(".tmp")
    tmp.write_text(f"{link.alias} {entry.host_key}\n", encoding="utf-8")
    os.replace(tmp, link.known_hosts)
    key = f"{state.resolve()}|{entry.service_id}|{entry.sftp}".encode()
    socket = _control_dir() / hashlib.sha256(key).hexdigest()[:20]
    return Link(**{**link.__dict__, "control_path": str(socket)})


def ssh_options(link: Link) -> list[str]:
    """The ``-o`` options of every ssh/sftp run for ``link``."""
    options = {
        "BatchMode": "yes",
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": str(link.known_hosts),
        "GlobalKnownHostsFile": "/dev/null",
        "HostKeyAlias": link.alias,
        "UpdateHostKeys": "no",
        "ConnectTimeout": str(max(1, round(link.connect_timeout))),
        "ServerAliveInterval": "5",
        "ServerAliveCountMax": "3",
        "ControlMaster": "auto",
        "ControlPath": link.control_path,
        "ControlPersist": str(CONTROL_PERSIST),
        "LogLevel": "ERROR",
    }
    if link.identity is not None:
        options["IdentitiesOnly"] = "yes"
        options["IdentityFile"] = str(link.identity)
    result: list[str] = []
    for name, value in options.items():
        result += ["-o", f"{name}={value}"]
    return result


_REASONS: tuple[tuple[str, str, bool], ...] = (
    (
        r"host key verification failed|identification has changed|host key .* not known|"
        r"no \S+ host key is known",
        "host key does not match the pinned host_key (refused)",
        False,
    ),
    (r"permission denied \(", "authentication refused", False),
    (r"connection refused", "connection refused", True),
    (r"timed out|operation timed out", "connection timed out", True),
    (r"no route to host|network is unreachable", "host unreachable", True),
    (r"could not resolve|name or service not known", "host name does not resolve", True),
    (
        r"connection closed|broken pipe|connection reset|lost connection|connection .* closed",
        CONNECTION_LOST,
        True,
    ),
    (r"no space left|disk quota|quota exceeded", "remote disk full", True),
    (r"(?:cd|stat|canonicalize).*no such file", "remote folder missing", True),
    (
        r"(?:write|close|open|upload).*(?:failure|couldn't)",
        "remote write failed (disk full?)",
        True,
    ),
    (r"permission denied", "remote folder not writable", True),
    # A file's folder is gone (a later cut makes only folders the target lacked).
    (r"dest open .*no such file", "remote folder missing", True),
)


_EXPECTED = re.compile(r"^remote mkdir .*: failure$", re.IGNORECASE)
"""A ``-mkdir`` of a folder the target already has: the batch goes on, not a reason."""


def explain(output: str, code: int) -> DeliveryError:
    """The one-line reason of a failed sftp run (its stderr and exit status).

    A negative ``code`` is the signal that ended sftp: ``SIGPIPE`` means the
    connection closed under it (the server's side died mid-transfer).
    """
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not _EXPECTED.match(ln)]
    text = "\n".join(lines).lower()
    for pattern, reason, retry in _REASONS:
        if re.search(pattern, text):
            return DeliveryError(reason, retry)
    if code == -signal.SIGPIPE:
        return DeliveryError(CONNECTION_LOST)
    if code < 0:
        return DeliveryError(f"sftp ended by signal {signal.Signals(-code).name}")
    return DeliveryError(f"sftp exit {code}: {lines[-1] if lines else 'no message'}"[:200])


def connect(link: Link, timeout: float, cancelled: Callable[[], bool] = lambda: False) -> None:
    """Open the target's multiplexed connection unless its socket is already there.

    Run before the target takes a transfer slot, so a target that does not
    answer waits out its ``ConnectTimeout`` without holding a slot the others
    need. A stale socket (its master gone) is left to the batch: ``ssh``
    removes it and connects by itself. Raises ``DeliveryError`` or ``Cancelled``.
    """
    if os.path.exists(link.control_path):
        return
    target = link.target
    command = ["ssh", "-N", "-f", "-p", str(target.port), *ssh_options(link)]
    command.append(f"{target.user}@{_host(target.host)}")
    code, output = _run(command, timeout, cancelled, "ssh", "connection timed out")
    if code != 0:
        raise explain(output, code)


def run_batch(
    link: Link,
    lines: list[str],
    timeout: float,
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """Run one sftp batch for ``link``; stop it when ``cancelled()`` turns true.

    Raises ``DeliveryError`` (one-line reason) or ``Cancelled``.
    """
    target = link.target
    with tempfile.TemporaryDirectory(prefix="prep-sftp-") as work:
        batch = Path(work) / "batch"
        batch.write_text("\n".join(lines) + "\n", encoding="utf-8")
        command = ["sftp", "-b", str(batch), "-P", str(target.port), *ssh_options(link)]
        command.append(f"{target.user}@{_host(target.host)}")
        took = f"upload took more than {timeout:g} s (killed)"
        code, output = _run(command, timeout, cancelled, "sftp", took)
    if code != 0:
        error = explain(output, code)
        if str(error) == CONNECTION_LOST:
            # A multiplexed connection may be held by a server process that outlived
            # the fault (an sshd restarted keeps its old sessions): retry on a new one.
            close_master(link)
        raise error


def run_batches(
    link: Link,
    parts: list[list[str]],
    last: list[str],
    timeout: float,
    cancelled: Callable[[], bool] = lambda: False,
) -> None:
    """Run the ``parts`` batches at once (sessions over the one connection), then,
    once every part has succeeded, ``last`` (the batch that ends the cut).

    The first part to fail stops the others; its reason is raised. Raises
    ``DeliveryError`` or ``Cancelled``.
    """
    deadline = time.monotonic() + timeout
    failed = threading.Event()
    errors: list[Error] = []

    def part(lines: list[str]) -> None:
        try:
            run_batch(link, lines, timeout, lambda: failed.is_set() or cancelled())
        except Error as exc:
            if not failed.is_set():
                errors.append(exc)
            failed.set()

    threads = [threading.Thread(target=part, args=(p,), name="sftp-part") for p in parts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    run_batch(link, last, max(1.0, deadline - time.monotonic()), cancelled)


def _run(
    command: list[str], timeout: float, cancelled: Callable[[], bool], name: str, late: str
) -> tuple[int, str]:
    """Run an OpenSSH client (stderr to a file: a master it leaves behind keeps it
    open); its exit status and stderr. ``late`` is the reason when it is killed
    after ``timeout``. Raises ``DeliveryError`` or ``Cancelled``."""
    with tempfile.TemporaryFile() as stderr:
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        except FileNotFoundError:
            raise DeliveryError(f"the OpenSSH {name} client is not installed", False) from None
        code = _wait(proc, timeout, cancelled, late)
        stderr.seek(0)
        return code, stderr.read().decode("utf-8", "replace")


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _wait(
    proc: subprocess.Popen[bytes], timeout: float, cancelled: Callable[[], bool], late: str
) -> int:
    """Wait for the client; kill its process group on timeout or cancellation."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return proc.wait(timeout=POLL)
        except subprocess.TimeoutExpired:
            pass
        stop = cancelled()
        if stop or time.monotonic() > deadline:
            _kill(proc)
            if stop:
                raise Cancelled("superseded by a newer cut")
            raise DeliveryError(late)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def close_master(link: Link) -> None:
    """Close the target's multiplexed connection, if one is open."""
    if not os.path.exists(link.control_path):
        return
    command = ["ssh", "-O", "exit", "-o", f"ControlPath={link.control_path}", "-p"]
    command += [str(link.target.port), f"{link.target.user}@{_host(link.target.host)}"]
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(command, capture_output=True, timeout=10, check=False)
