"""Delivery of a signed cut into a difusor's drop folder, in the institute's upload order.

prep-cut-v1 §1.2: the files the manifest lists (only those whose bytes
changed), then the manifest, and last the signature, under a temporary name
renamed into place. Two ways: a local copy (:func:`deliver_local`) and the
OpenSSH ``sftp`` client in batch mode (:func:`deliver_sftp`, whose batch is
:func:`sftp_batch`); :func:`split_target` checks an ``user@host:dir`` target.
"""

from __future__ import annotations

import filecmp
import json
import os
import posixpath
import re
import shutil
import subprocess
import tempfile
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Callable

from prep_agent.core.errors import Error
from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME

__all__ = [
    "batch_lines",
    "deliver_local",
    "deliver_sftp",
    "listed_files",
    "sftp_batch",
    "split_target",
]


def listed_files(source: Path) -> list[str]:
    """The paths a signed cut folder's manifest lists, in upload order. Raises ``Error``."""
    try:
        doc = json.loads((source / MANIFEST_NAME).read_bytes())
        return sorted(str(entry["path"]) for entry in doc["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Error(f"{source / MANIFEST_NAME} is not a readable manifest: {exc}") from None


def _unchanged(source: Path, target: Path) -> bool:
    """Whether ``target`` exists with the very bytes of ``source``."""
    try:
        same_size = target.is_file() and target.stat().st_size == source.stat().st_size
        return same_size and filecmp.cmp(source, target, shallow=False)
    except OSError:
        return False


def deliver_local(source: Path, inbox: Path) -> None:
    """Copy the signed cut ``source`` into the drop folder ``inbox`` in upload order.

    Listed files whose bytes are already in ``inbox`` are skipped (a delta
    upload); then the manifest, and last the signature under a temporary name
    renamed into place (spec §1.2). Raises ``Error`` or OSError.
    """
    for rel in listed_files(source):
        target = inbox / rel
        if not _unchanged(source / rel, target):
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel, target)
    shutil.copyfile(source / MANIFEST_NAME, inbox / MANIFEST_NAME)
    temporary = inbox / f".{SIGNATURE_NAME}.part"
    shutil.copyfile(source / SIGNATURE_NAME, temporary)
    os.replace(temporary, inbox / SIGNATURE_NAME)


_UNQUOTABLE = re.compile(r'["\\*?\[\]\x00-\x1f\x7f]')
"""Characters an sftp batch cannot carry plainly in a quoted path (quoting, globbing)."""


def _quote(path: str) -> str:
    if _UNQUOTABLE.search(path):
        raise Error(f"path {path!r} cannot be uploaded in an sftp batch")
    return f'"{path}"'


def split_target(target: str) -> tuple[str, str]:
    """Split ``user@host:dir`` (or ``user@[v6]:dir``) into destination and folder.

    Raises ``Error`` if there is no host.
    """
    found = re.fullmatch(r"((?:[^@/:]+@)?(?:\[[^\]]+\]|[^:\[\]/]+))(?::(.*))?", target)
    if found is None:
        raise Error(f"sftp target {target!r} is not USER@HOST:DIR")
    return found.group(1), found.group(2) or ""


def sftp_batch(source: Path, directory: str, previous: Path | None = None) -> list[str]:
    """The sftp batch lines uploading the cut ``source`` into ``directory``.

    Files whose bytes equal the same path in ``previous`` (the cut delivered
    last to the same target) are not uploaded again. Raises ``Error``.
    """
    send = [
        rel
        for rel in listed_files(source)
        if previous is None or not _unchanged(source / rel, previous / rel)
    ]
    return batch_lines(source, directory, send)


GROUP = 3
"""Files of one folder from which a batch ``cd``s there to send them by their own
names (a ``cd`` is 2 round trips; a ``put`` with a remote name stats it first)."""


def batch_lines(
    folder: Path,
    directory: str,
    send: list[str],
    local: Callable[[str], Path] | None = None,
    signed: bool = True,
    existing: Collection[str] = (),
    view: Path | None = None,
) -> list[str]:
    """The sftp batch: ``cd directory`` (if given), the folders and the ``send``
    files of the cut ``folder``, its manifest, then its signature under a
    temporary name renamed into place (``signed=False``: without those two, for
    one of several batches sent before the one that ends the cut).
    ``local(rel)`` names the file uploaded as ``rel`` (default:
    ``folder / rel``). No ``-mkdir`` for the folders in ``existing`` (the
    target holds them already: each ``-mkdir`` is a round trip). With
    ``view``, a folder holding ``rel`` as ``view / rel`` (same bytes as
    ``local(rel)``), a folder with at least ``GROUP`` files to send gets them
    as ``cd FOLDER`` and ``put VIEW/REL`` without a remote name, which spares
    sftp's stat of each destination. Raises ``Error`` for a path a batch
    cannot carry.
    """
    source = local or (lambda rel: folder / rel)
    lines = [f"cd {_quote(directory)}"] if directory else []
    made: set[str] = set(existing)
    groups: dict[str, list[str]] = {}
    for rel in sorted(send):
        parts = rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            sub = "/".join(parts[:depth])
            if sub not in made:
                made.add(sub)
                lines.append(f"-mkdir {_quote(sub)}")
        groups.setdefault(rel.rpartition("/")[0], []).append(rel)
    for parent, rels in groups.items():
        if view is None or (parent and len(rels) < GROUP):
            lines += [f"put {_quote(str(source(rel)))} {_quote(rel)}" for rel in rels]
        elif not parent:
            lines += [f"put {_quote(str(view / rel))}" for rel in rels]
    here = ""
    for parent, rels in groups.items():
        if view is not None and parent and len(rels) >= GROUP:
            if parent != here:
                lines.append(f"cd {_quote(posixpath.relpath(parent or '.', here or '.'))}")
                here = parent
            lines += [f"put {_quote(str(view / rel))}" for rel in rels]
    if here and signed:
        lines.append(f"cd {_quote(posixpath.relpath('.', here))}")
    if not signed:
        return lines
    temporary = f".{SIGNATURE_NAME}.part"
    lines.append(f"put {_quote(str(source(MANIFEST_NAME)))} {_quote(MANIFEST_NAME)}")
    lines.append(f"put {_quote(str(source(SIGNATURE_NAME)))} {_quote(temporary)}")
    # OpenSSH's sftp renames with posix-rename@openssh.com when the server has it
    # (sftp-server does), which replaces the previous signature atomically.
    lines.append(f"rename {_quote(temporary)} {_quote(SIGNATURE_NAME)}")
    return lines


def folders_of(paths: Iterable[str]) -> set[str]:
    """Every folder (and parent folder) holding one of ``paths`` (relative, ``/``-separated)."""
    folders: set[str] = set()
    for rel in paths:
        parent = rel.rpartition("/")[0]
        while parent and parent not in folders:
            folders.add(parent)
            parent = parent.rpartition("/")[0]
    return folders


def deliver_sftp(
    source: Path,
    target: str,
    identity: Path | None = None,
    port: int | None = None,
    extra_options: Sequence[str] = (),
    previous: Path | None = None,
    sftp_server: str | None = None,
    timeout: float = 600.0,
) -> None:
    """Upload the signed cut ``source`` to ``user@host:dir`` with the OpenSSH ``sftp`` client.

    Batch mode (``-b``): folders with ``-mkdir``, changed files (see
    :func:`sftp_batch` for ``previous``), the manifest, then the signature under
    a temporary name renamed into place. ``extra_options`` are ``-o`` options;
    ``sftp_server`` is a local server command given to ``sftp -D`` instead of
    connecting to the host (tests). Raises ``Error`` if sftp fails.
    """
    destination, directory = split_target(target)
    command = ["sftp", "-q"]
    command += ["-i", str(identity)] if identity is not None else []
    command += ["-P", str(port)] if port is not None else []
    for option in extra_options:
        command += ["-o", option]
    command += ["-D", sftp_server] if sftp_server is not None else [destination]
    lines = sftp_batch(source, directory, previous)
    with tempfile.TemporaryDirectory(prefix="prep-sftp-") as work:
        batch = Path(work) / "batch"
        batch.write_text("\n".join(lines) + "\n", encoding="utf-8")
        _run_sftp([*command[:2], "-b", str(batch), *command[2:]], timeout)


def _run_sftp(command: list[str], timeout: float) -> None:
    """Run sftp; raise ``Error`` with its last message if it fails."""
    try:
        proc = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError:
        raise Error("the OpenSSH sftp client is not installed") from None
    except subprocess.TimeoutExpired:
        raise Error(f"sftp upload took more than {timeout:g} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        raise Error(f"sftp upload failed (exit {proc.returncode}): {lines[-1] if lines else ''}")
