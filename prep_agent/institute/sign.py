"""The institute's side: write ``prep-manifest.json`` for a folder and sign it."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prep_agent.core import sshkeys, sshsig
from prep_agent.core.errors import Error
from prep_agent.core.manifest import (
    FORMAT,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    WELL_KNOWN,
    parse_rfc3339,
)
from prep_agent.core.protocol import NAMESPACE_CUT


@dataclass(frozen=True)
class CutInfo:
    """The signed facts of a cut besides its files."""

    election: str
    sequence: int
    cut_time: str
    final: bool = False
    notice_level: str | None = None
    notice_text: str | None = None
    entry: str | None = None
    period_seconds: int | None = None
    signed_at: str | None = None


def hash_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 (hex) of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def list_files(folder: Path) -> list[dict[str, Any]]:
    """The ``files`` array for every regular file under ``folder`` (sorted)."""
    skip = {MANIFEST_NAME, SIGNATURE_NAME}
    entries = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if rel in skip or rel.startswith(WELL_KNOWN + "/") or not path.is_file():
                continue
            size, sha = hash_file(path)
            entries.append({"path": rel, "size": size, "sha256": sha})
    return sorted(entries, key=lambda e: str(e["path"]))


def manifest_bytes(folder: Path, info: CutInfo) -> bytes:
    """Build the manifest of ``folder`` as UTF-8 JSON bytes.

    Raises ``Error`` if the folder is empty or the entry page is not in it.
    """
    files = list_files(folder)
    if not files:
        raise Error(f"{folder} holds no file to sign")
    paths = {f["path"] for f in files}
    entry = info.entry or ("index.html" if "index.html" in paths else None)
    if entry is None or entry not in paths:
        raise Error(f"entry page {entry or 'index.html'!r} is not in {folder}")
    parse_rfc3339(info.cut_time, "cut_time")
    signed_at = info.signed_at or datetime.now(timezone.utc).isoformat(timespec="seconds")
    doc: dict[str, Any] = {
        "format": FORMAT,
        "election": info.election,
        "sequence": info.sequence,
        "cut_time": info.cut_time,
        "signed_at": signed_at,
    }
    if info.period_seconds is not None:
        doc["period_seconds"] = info.period_seconds
    if info.final:
        doc["final"] = True
    if info.notice_level is not None:
        doc["notice"] = {"level": info.notice_level, "text": info.notice_text or ""}
    doc["entry"] = entry
    doc["files"] = files
    return json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8") + b"\n"


def load_key(path: Path) -> sshkeys.PrivateKey:
    """Read an unencrypted OpenSSH private key. Raises ``Error``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise Error(f"cannot read key {path}: {exc.strerror}") from None
    return sshkeys.load_private_key(data)


def sign_folder(folder: Path, key: sshkeys.PrivateKey, info: CutInfo) -> bytes:
    """Write the manifest, then its signature last, into ``folder``; return the manifest."""
    data = manifest_bytes(folder, info)
    signature = sshsig.armor(sshsig.sign(key, data, NAMESPACE_CUT))
    (folder / MANIFEST_NAME).write_bytes(data)
    tmp = folder / f".{SIGNATURE_NAME}.tmp"
    tmp.write_bytes(signature)
    os.replace(tmp, folder / SIGNATURE_NAME)
    return data
