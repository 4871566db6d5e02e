"""Real sshd targets for ``prep-agent distribute``, and a black-holed address.

One ``sshd`` (its own host key, port and authorized_keys) serves any number
of target folders for the user running the tests (root in CI), over the real
``internal-sftp``. A :class:`BlackHole` is a network namespace reached by a
veth pair whose input chain drops everything: connections get no answer. The
test creates and removes it. The institute config is written as an operator
would, with one ``[difusor:ID]`` section per target.
"""

from __future__ import annotations

import getpass
import os
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.kit import PREP_AGENT, free_port, keygen, stop_process, wait_port


def _run(command: list[str]) -> str:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{command}: {proc.stderr}"
    return proc.stdout


class Sshd:
    """A real sshd on 127.0.0.1 with ``internal-sftp``, key login only."""

    def __init__(self, folder: Path, authorized: Iterable[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.host_key = folder / "host_key"
        self.host_public = keygen(self.host_key)
        (folder / "authorized_keys").write_text("".join(f"{k}\n" for k in authorized))
        self.config = folder / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"PidFile {folder}/sshd.pid\nAuthorizedKeysFile {folder}/authorized_keys\n"
            "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n"
            "MaxStartups 200:30:400\nMaxSessions 200\nLogLevel VERBOSE\n"
        )
        self.log = folder / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sshd:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation folder
        _run(["/usr/sbin/sshd", "-t", "-f", str(self.config)])
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_port(self.port, what="sshd", alive=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def known_hosts_line(self) -> str:
        """The line an operator copies from the difusor (``ssh-keyscan`` format)."""
        return f"[127.0.0.1]:{self.port} {self.host_public}"


class BlackHole:
    """A network namespace whose address answers nothing (input policy drop)."""

    def __init__(self, index: int = 1) -> None:
        tag = f"{os.getpid() % 10000}{index}"
        self.netns = f"pa-bh-{tag}"
        self.host_if = f"pabh{tag}h"
        self.ns_if = f"pabh{tag}n"
        octet = 16 + (os.getpid() + index) % 200
        self.host_address = f"10.231.{octet}.1"
        self.address = f"10.231.{octet}.2"

    def __enter__(self) -> BlackHole:
        ns = ["ip", "netns", "exec", self.netns]
        _run(["ip", "netns", "add", self.netns])
        try:
            _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if])
            _run(["ip", "link", "set", self.ns_if, "netns", self.netns])
            _run(["ip", "addr", "add", f"{self.host_address}/30", "dev", self.host_if])
            _run(["ip", "link", "set", self.host_if, "up"])
            _run([*ns, "ip", "addr", "add", f"{self.address}/30", "dev", self.ns_if])
            _run([*ns, "ip", "link", "set", self.ns_if, "up"])
            _run([*ns, "nft", "add", "table", "inet", "blackhole"])
            _run(
                [*ns, "nft", "add", "chain", "inet", "blackhole", "input",
                 "{ type filter hook input priority 0; policy drop; }"]
            )  # fmt: skip
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True, check=False)


@dataclass
class Target:
    """One difusor's upload folder as ``[difusor:ID]`` describes it."""

    service_id: str
    inbox: Path
    host: str = "127.0.0.1"
    port: int = 22
    host_key: str = ""
    identity: Path | None = None
    status_url: str | None = None
    enabled: bool = True

    def section(self) -> str:
        lines = [
            f"[difusor:{self.service_id}]",
            f"name = Diario {self.service_id}",
            f"contact = Mesa de {self.service_id}, 844 000 0000",
            f"sftp = {getpass.getuser()}@{self.host}:{self.port}:{self.inbox}",
            f"host_key = {self.host_key}",
            f"enabled = {'yes' if self.enabled else 'no'}",
        ]
        lines += [f"identity = {self.identity}"] if self.identity else []
        lines += [f"status_url = {self.status_url}"] if self.status_url else []
        return "\n".join(lines) + "\n"


def write_config(
    path: Path, signers: Path, targets: Iterable[Target], **distribute: object
) -> Path:
    """The institute config (collector and distribute) for ``targets``."""
    trust = path.parent / "difusores_allowed_signers"
    trust.touch()
    settings = {
        "allowed_signers": signers,
        "election": "coah-ayun-2021",
        "workers": 8,
        "connect_timeout": 2,
        "transfer_timeout": 20,
        "retry_for": 6,
        "backoff_max": 2,
        "confirm_timeout": 20,
        **distribute,
    }
    text = f"[collector]\ntrust = {trust}\ndatabase = {path.parent / 'collector.sqlite'}\n\n"
    text += "[distribute]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()) + "\n"
    text += "\n".join(t.section() for t in targets)
    path.write_text(text)
    return path


def distribute(conf: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    """Run ``prep-agent distribute --config CONF ARGS`` as a real process."""
    return subprocess.run(
        [PREP_AGENT, "distribute", "--config", str(conf), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
