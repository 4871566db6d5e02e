"""Real agent daemons that push to a real collector, all on loopback.

Keys come from the real ``prep-agent keygen``; agents and the collector run as
``prep-agent run`` / ``prep-agent collector`` processes; cuts are signed by
``ssh-keygen`` (the kit's institute) and their manifests are written to the
folder the collector reads, as the institute's outgoing copies.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from prep_agent.agent.config import Config
from prep_agent.agent.journal import read_journal
from prep_agent.core import sshkeys, sshsig
from tests.kit import PREP_AGENT, AgentDaemon, Daemon, Institute, free_port, make_config, minute_ago


def keygen(key: Path, service_id: str) -> str:
    """``prep-agent keygen``; return the printed allowed_signers line."""
    proc = subprocess.run(
        [PREP_AGENT, "keygen", "--key", str(key), "--service-id", service_id],
        capture_output=True,
        text=True,
        check=True,
    )
    return proc.stdout.strip()


class _Process:
    """Start, stop and kill one ``prep-agent`` process (``daemon``) that logs to HOME."""

    daemon: Daemon | None

    def stop(self) -> None:
        """SIGTERM; it must exit 0."""
        if self.daemon is not None and self.daemon.running():
            code = self.daemon.stop()
            assert code == 0, self.daemon.output(2000)

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.kill(timeout=10)


@dataclass
class Difusor(_Process):
    """One ``prep-agent run`` process that pushes its health reports."""

    service_id: str
    home: Path
    config: Config
    key: Path
    url: str
    token: str
    daemon: Daemon | None = None

    def start(self) -> None:
        self.daemon = AgentDaemon(self.home / "prep-agent.conf").start(timeout=20)

    def journal(self, event: str) -> list[dict[str, Any]]:
        return [e for e in read_journal(self.config.journal_file) if e["event"] == event]

    def published(self, sequence: int) -> bool:
        try:
            status = requests.get(self.url + "/status.json", timeout=2).json()
        except (requests.RequestException, ValueError):
            return False
        return bool(status.get("sequence") == sequence)


def make_difusor(
    tmp: Path, inst: Institute, service_id: str, push_urls: str, **settings: Any
) -> tuple[Difusor, str]:
    """Configure (not start) a difusor; return it and its allowed_signers line."""
    home = tmp / service_id
    home.mkdir(parents=True)
    key = home / "report_key"
    line = keygen(key, service_id)
    token = f"token-{service_id}"
    (home / "token").write_text(token + "\n")
    port = free_port()
    values: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "service_id": service_id,
        "urls": push_urls,
        "key": key,
        "period_seconds": 1,
        "connect_timeout": 1,
        "read_timeout": 2,
        "rescan_interval": 1,
        "token_file": home / "token",
        "allow": "10.255.255.0/24",
    }
    values.update(settings)
    config = make_config(home, inst, **values)
    return Difusor(service_id, home, config, key, f"http://127.0.0.1:{port}", token), line


@dataclass
class CollectorProc(_Process):
    """One ``prep-agent collector`` process."""

    home: Path
    port: int
    manifests: Path
    trust: Path
    settings: dict[str, Any] = field(default_factory=dict)
    difusores: list[Difusor] = field(default_factory=list)
    poll: bool = True
    daemon: Daemon | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        values = {
            "listen": f"127.0.0.1:{self.port}",
            "database": self.home / "collector.sqlite",
            "trust": self.trust,
            "manifests": self.manifests,
            "report_period": 1,
            "silent_after": 3,
            "poll_interval": 1,
            "connect_timeout": 1,
            "read_timeout": 2,
            "period_seconds": 2,
            "unlink_periods": 3,
            "refresh_seconds": 2,
            **self.settings,
        }
        lines = ["[collector]", *(f"{k} = {v}" for k, v in values.items())]
        for d in self.difusores:
            lines += [f"[difusor:{d.service_id}]", f"name = Diario {d.service_id[-1].upper()}"]
            if self.poll:
                lines += [f"health_url = {d.url}/health", f"token_file = {d.home / 'token'}"]
        path = self.home / "collector.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        args = ["collector", "--config", str(self.write_config())]
        log = self.home / "collector.log"
        self.daemon = Daemon(args, log, livez=self.url + "/livez").start(timeout=20)

    def api(self) -> dict[str, Any]:
        doc: dict[str, Any] = requests.get(self.url + "/api/difusores", timeout=5).json()
        return doc

    def rows(self) -> dict[str, dict[str, Any]]:
        return {row["service_id"]: row for row in self.api()["difusores"]}

    def post(self, body: bytes, signature: str | None) -> requests.Response:
        headers = {"Content-Type": "application/health+json"}
        if signature is not None:
            headers["PREP-Signature"] = signature
        return requests.post(self.url + "/reports", data=body, headers=headers, timeout=5)


def deliver_cut(inst: Institute, inboxes: list[Path], manifests: Path, sequence: int) -> float:
    """Sign one cut (signed_at now) into each inbox and the institute's outgoing folder;
    return the wall time of delivery."""
    when = minute_ago(max(1, 60 - sequence))  # never in the future, never decreasing
    files = inst.files(when, sequence)
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    doc = inst.manifest(files, sequence, when, signed_at=now)
    data = json.dumps(doc, indent=1).encode()
    out = manifests / f"{sequence:06d}"
    out.mkdir(parents=True)
    (out / "prep-manifest.json").write_bytes(data)
    delivered = time.time()
    for inbox in inboxes:
        inst.deliver(inbox, files, raw=data)
    return delivered


def signed(doc: dict[str, Any], key: Path) -> tuple[bytes, str]:
    """A report body and its PREP-Signature, as a difusor would send them."""
    body = json.dumps(doc).encode()
    private = sshkeys.load_private_key(key.read_bytes())
    return body, base64.b64encode(sshsig.sign(private, body, "prep-health")).decode()


def journal_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()
