"""A fake institute for tests: makes, mutates and signs cuts with the real ssh-keygen.

Signing goes through ``ssh-keygen -Y sign`` (not our own signer), so the agent
is always tested against signatures OpenSSH itself produced; ``ssh_verify``
checks what was published with ``ssh-keygen -Y verify``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from prep_agent.agent.config import Config, load, render_template

SHARED = Path(__file__).resolve().parents[3] / "shared"
"""The read-only shared folder beside the project."""
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
