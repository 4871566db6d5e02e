"""A fake institute for tests: makes, mutates and signs cuts with the real ssh-keygen.

Signing goes through ``ssh-keygen -Y sign`` (not our own signer), so the agent
is always tested against signatures OpenSSH itself produced.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from prep_agent.agent.config import Config, load, render_template

SHARED = Path(__file__).resolve().parents[2] / "shared"
"""The read-only shared folder beside the project."""
PREP_AGENT = str(Path(sys.executable).parent / "prep-agent")
"""The installed command of the venv running the tests."""
OFFSET = timezone(timedelta(hours=-6))
ELECTION = "coah-ayun-2021"


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


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Poll ``predicate`` until it holds; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout} s {what}".rstrip())


def ssh_verify(allowed_signers: Path, sig: Path, data: bytes, principal: str = "iec") -> None:
    """Check ``sig`` over ``data`` with the real ``ssh-keygen -Y verify`` (raises if refused)."""
    subprocess.run(
        [
            "ssh-keygen",
            "-Y",
            "verify",
            "-f",
            str(allowed_signers),
            "-I",
            principal,
            "-n",
            "prep-cut",
            "-s",
            str(sig),
        ],
        input=data,
        check=True,
        capture_output=True,
    )


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
