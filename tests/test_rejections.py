"""Every rejection rule of prep-cut-v1: the bad cut is refused with its reason
class, nothing is published, the previous cut stays current byte for byte, and
the bad cut is quarantined with its reason."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import zipfile
from collections.abc import Callable
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from prep_agent.daemon import Agent
from tests.kit import (
    ELECTION,
    Institute,
    csv_bytes,
    keygen,
    make_config,
    minute_ago,
    ssh_sign,
    tree_digest,
)

Case = Callable[[Institute, Path, Path], None]
"""Delivers a bad cut: (institute, inbox, scratch folder)."""

GOOD_TIME = minute_ago(30)
BAD_TIME = minute_ago(20)


def files_at(inst: Institute, sequence: int = 3) -> dict[str, bytes]:
    return inst.files(BAD_TIME, sequence)


def with_doc(**changes: Any) -> Case:
    """A cut of sequence 3 whose manifest has keys changed (None deletes)."""

    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        files = files_at(inst)
        doc = inst.manifest(files, 3, BAD_TIME)
        for key, value in changes.items():
            if value is None:
                doc.pop(key)
            else:
                doc[key] = value
        inst.deliver(inbox, files, doc)

    return deliver


def with_file_entries(mutate: Callable[[list[dict[str, Any]]], None]) -> Case:
    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        files = files_at(inst)
        doc = inst.manifest(files, 3, BAD_TIME)
        mutate(doc["files"])
        inst.deliver(inbox, files, doc)

    return deliver


def with_path(path: str) -> Case:
    """A listed file under a bad path (the data goes to a harmless name)."""

    def mutate(entries: list[dict[str, Any]]) -> None:
        entries.append({"path": path, "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()})

    return with_file_entries(mutate)


def with_raw(make: Callable[[Institute], bytes]) -> Case:
    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        inst.deliver(inbox, files_at(inst), raw=make(inst))

    return deliver


def with_sig(make: Callable[[Institute, bytes, Path], bytes]) -> Case:
    """A valid manifest with a signature made by ``make(inst, manifest, tmp)``."""

    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        files = files_at(inst)
        data = json.dumps(inst.manifest(files, 3, BAD_TIME)).encode()
        inst.deliver(inbox, files, raw=data, sig=make(inst, data, tmp))

    return deliver


def blob_of(armored: bytes) -> bytes:
    body = b"".join(armored.strip().splitlines()[1:-1])
    return base64.b64decode(body)


def rearmor(blob: bytes) -> bytes:
    text = base64.b64encode(blob)
    lines = [text[i : i + 70] for i in range(0, len(text), 70)]
    return (
        b"-----BEGIN SSH SIGNATURE-----\n" + b"\n".join(lines) + b"\n-----END SSH SIGNATURE-----\n"
    )


def mutate_blob(change: Callable[[bytes], bytes]) -> Callable[[Institute, bytes, Path], bytes]:
    return lambda inst, data, tmp: rearmor(change(blob_of(ssh_sign(inst.key, data))))


def flip_last_byte(blob: bytes) -> bytes:
    return blob[:-1] + bytes([blob[-1] ^ 1])


def version_2(blob: bytes) -> bytes:
    return blob[:6] + (2).to_bytes(4, "big") + blob[10:]


def replace_field(old: bytes, new: bytes) -> Callable[[bytes], bytes]:
    def change(blob: bytes) -> bytes:
        def field(value: bytes) -> bytes:
            return len(value).to_bytes(4, "big") + value

        assert field(old) in blob
        return blob.replace(field(old), field(new), 1)

    return change


def other_key(
    kind: str, bits: int = 0, options: str = ""
) -> Callable[[Institute, bytes, Path], bytes]:
    """Sign with a fresh key; optionally add it to allowed_signers with ``options``."""

    def make(inst: Institute, data: bytes, tmp: Path) -> bytes:
        key = tmp / f"k_{kind}_{bits}"
        public = keygen(key, kind, bits or None)
        if options is not None and options != "untrusted":
            with inst.allowed_signers.open("a") as fh:
                fh.write(f"iec {options} {public}\n")
        return ssh_sign(key, data)

    return make


def ssh_string(value: bytes) -> bytes:
    return len(value).to_bytes(4, "big") + value


def rsa_sha1(inst: Institute, data: bytes, tmp: Path) -> bytes:
    """A well-formed SSHSIG by a trusted RSA 3072 key, but with the SHA-1 ``ssh-rsa`` algorithm."""
    key_path = tmp / "rsa3072"
    public = keygen(key_path, "rsa", 3072)
    with inst.allowed_signers.open("a") as fh:
        fh.write(f"iec {public}\n")
    key = serialization.load_ssh_private_key(key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    header = b"".join(ssh_string(x) for x in (b"prep-cut", b"", b"sha512"))
    to_sign = b"SSHSIG" + header + ssh_string(hashlib.sha512(data).digest())
    raw = key.sign(to_sign, padding.PKCS1v15(), hashes.SHA1())
    blob = (
        b"SSHSIG"
        + (1).to_bytes(4, "big")
        + ssh_string(base64.b64decode(public.split()[1]))
        + header
        + ssh_string(ssh_string(b"ssh-rsa") + ssh_string(raw))
    )
    return rearmor(blob)


def rogue_embedded(inst: Institute, data: bytes, tmp: Path) -> bytes:
    """The trusted key's public blob with a rogue key's signature inside."""
    rogue = tmp / "rogue"
    keygen(rogue, "ed25519")
    good, bad = blob_of(ssh_sign(inst.key, data)), blob_of(ssh_sign(rogue, data))
    # Both blobs have the same layout; keep the header of the good one, the signature of the bad.
    return rearmor(good[: len(good) - 83] + bad[len(bad) - 83 :])


def incomplete(inst: Institute, inbox: Path, tmp: Path) -> None:
    files = files_at(inst)
    doc = inst.manifest(files, 3, BAD_TIME)
    del files["datos/COAH_AYUN_2021.csv"]
    (inbox / "datos" / "COAH_AYUN_2021.csv").unlink()
    inst.deliver(inbox, files, doc)


def tampered(size_change: int) -> Case:
    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        files = files_at(inst)
        doc = inst.manifest(files, 3, BAD_TIME)
        page = files["index.html"]
        files["index.html"] = page[:-1] + b"X" if size_change == 0 else page + b"!"
        inst.deliver(inbox, files, doc)

    return deliver


def special_file(kind: str) -> Case:
    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        files = files_at(inst)
        doc = inst.manifest(files, 3, BAD_TIME)
        page = files.pop("index.html")
        target = inbox / "index.html"
        target.unlink(missing_ok=True)
        if kind == "symlink":
            (tmp / "outside.html").write_bytes(page)
            target.symlink_to(tmp / "outside.html")
        elif kind == "dirlink":
            files["index.html"] = page
            outside = tmp / "outside"
            outside.mkdir()
            csv = files.pop("datos/COAH_AYUN_2021.csv")
            (outside / "COAH_AYUN_2021.csv").write_bytes(csv)
            shutil.rmtree(inbox / "datos")
            (inbox / "datos").symlink_to(outside)
        elif kind == "fifo":
            os.mkfifo(target)
        else:
            target.mkdir()
        inst.deliver(inbox, files, doc)

    return deliver


def zip_bytes(members: dict[str, bytes]) -> bytes:
    out = BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return out.getvalue()


def with_extra_file(name: str, data_for: Callable[[], bytes], copies: int = 1) -> Case:
    """Add a file (or ``copies`` numbered copies of it) to the cut."""

    def deliver(inst: Institute, inbox: Path, tmp: Path) -> None:
        files = files_at(inst)
        for i in range(copies):
            files[name if copies == 1 else f"{i}-{name}"] = data_for()
        inst.deliver(inbox, files, inst.manifest(files, 3, BAD_TIME))

    return deliver


def bomb() -> bytes:
    out = BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("a.csv", "w") as member:
        chunk = b"0" * (1024 * 1024)
        for _ in range(100):
            member.write(chunk)
    return out.getvalue()


def duplicate_key(inst: Institute) -> bytes:
    files = files_at(inst)
    text = json.dumps(inst.manifest(files, 3, BAD_TIME))
    return text.replace('"sequence": 3', '"sequence": 3, "sequence": 4').encode()


def rollback(inst: Institute, inbox: Path, tmp: Path) -> None:
    files = inst.files(BAD_TIME, 0)
    inst.deliver(inbox, files, inst.manifest(files, 1, BAD_TIME, signed_at=BAD_TIME.isoformat()))


def equivocation(inst: Institute, inbox: Path, tmp: Path) -> None:
    files = inst.files(GOOD_TIME, 2)
    files["index.html"] = b"<h1>otro contenido</h1>"
    inst.deliver(inbox, files, inst.manifest(files, 2, GOOD_TIME))


def edited_after_signing(inst: Institute, inbox: Path, tmp: Path) -> None:
    files = files_at(inst)
    data = json.dumps(inst.manifest(files, 3, BAD_TIME)).encode()
    sig = ssh_sign(inst.key, data)
    inst.deliver(inbox, files, raw=data.replace(b'"sequence": 3', b'"sequence": 9'), sig=sig)


def short(h: str) -> str:
    return h[:-1]


FUTURE = minute_ago(-30)
CASES: dict[str, tuple[Case, str]] = {
    # §3 signatures
    "flipped signature": (with_sig(mutate_blob(flip_last_byte)), "signature-untrusted"),
    "truncated signature": (
        with_sig(lambda i, d, t: ssh_sign(i.key, d)[:-60]),
        "signature-malformed",
    ),
    "trailing data in blob": (
        with_sig(mutate_blob(lambda b: b + b"\0\0\0\0")),
        "signature-malformed",
    ),
    "trailing text after block": (
        with_sig(lambda i, d, t: ssh_sign(i.key, d) + b"junk\n"),
        "signature-malformed",
    ),
    "SSHSIG version 2": (with_sig(mutate_blob(version_2)), "signature-malformed"),
    "hash label md5": (
        with_sig(mutate_blob(replace_field(b"sha512", b"md5"))),
        "signature-malformed",
    ),
    "wrong namespace": (
        with_sig(lambda i, d, t: ssh_sign(i.key, d, namespace="file")),
        "signature-untrusted",
    ),
    "untrusted key": (with_sig(other_key("ed25519", options="untrusted")), "signature-untrusted"),
    "embedded trusted key, rogue signature": (with_sig(rogue_embedded), "signature-untrusted"),
    "key not yet valid": (
        with_sig(other_key("ed25519", options='valid-after="29990101"')),
        "signature-untrusted",
    ),
    "key expired": (
        with_sig(other_key("ed25519", options='valid-before="20200101"')),
        "signature-untrusted",
    ),
    "key for another namespace": (
        with_sig(other_key("ed25519", options='namespaces="file"')),
        "signature-untrusted",
    ),
    "ssh-rsa SHA-1": (with_sig(rsa_sha1), "signature-untrusted"),
    "RSA 2048": (with_sig(other_key("rsa", 2048, options="")), "signature-untrusted"),
    "manifest edited after signing": (edited_after_signing, "signature-untrusted"),
    "no signature block": (with_sig(lambda i, d, t: b""), "signature-malformed"),
    # §2 manifest
    "wrong election": (with_doc(election="coah-dip-2021"), "wrong-election"),
    "wrong format": (with_doc(format="prep-cut/2"), "manifest-invalid"),
    "unknown key": (with_doc(extra=1), "manifest-invalid"),
    "missing entry key": (with_doc(entry=None), "manifest-invalid"),
    "entry not listed": (with_doc(entry="otra.html"), "manifest-invalid"),
    "duplicate JSON key": (with_raw(duplicate_key), "manifest-invalid"),
    "not JSON": (with_raw(lambda i: b"{nope"), "manifest-invalid"),
    "sequence as string": (with_doc(sequence="2"), "manifest-invalid"),
    "sequence as float": (with_doc(sequence=2.0), "manifest-invalid"),
    "sequence as bool": (with_doc(sequence=True), "manifest-invalid"),
    "sequence 2^53": (with_doc(sequence=2**53), "manifest-invalid"),
    "time without offset": (
        with_doc(cut_time=BAD_TIME.strftime("%Y-%m-%dT%H:%M:%S")),
        "manifest-invalid",
    ),
    "uppercase hash": (
        with_file_entries(lambda e: e[0].update(sha256=e[0]["sha256"].upper())),
        "manifest-invalid",
    ),
    "short hash": (
        with_file_entries(lambda e: e[0].update(sha256=short(e[0]["sha256"]))),
        "manifest-invalid",
    ),
    "extra key in file entry": (
        with_file_entries(lambda e: e[0].update(mode=420)),
        "manifest-invalid",
    ),
    "notice too long": (with_doc(notice={"level": "info", "text": "x" * 501}), "manifest-invalid"),
    "period too short": (with_doc(period_seconds=59), "manifest-invalid"),
    # §2 paths
    "dot-dot path": (with_path("../escape.html"), "path-invalid"),
    "absolute path": (with_path("/etc/passwd"), "path-invalid"),
    "backslash path": (with_path("a\\b.html"), "path-invalid"),
    "empty segment": (with_path("a//b.html"), "path-invalid"),
    "control character": (with_path("a\x07.html"), "path-invalid"),
    "NUL": (with_path("a\x00.html"), "path-invalid"),
    "non-NFC path": (with_path("cafe\u0301.html"), "path-invalid"),
    "duplicate path": (with_path("index.html"), "path-invalid"),
    "case-colliding path": (with_path("INDEX.html"), "path-invalid"),
    "file and directory": (with_path("datos"), "path-invalid"),
    "reserved well-known": (with_path(".well-known/prep-cut/manifest.json"), "path-invalid"),
    "reserved well-known casefold": (with_path(".Well-Known/PREP-cut/x"), "path-invalid"),
    "reserved manifest name": (with_path("PREP-manifest.json"), "path-invalid"),
    "too deep": (with_path("/".join(["d"] * 33)), "path-invalid"),
    # §4.3 order
    "rollback": (rollback, "rollback"),
    "equivocation": (equivocation, "equivocation"),
    # §4.4 time
    "future cut_time": (
        with_doc(
            cut_time=FUTURE.isoformat(), signed_at=(FUTURE + timedelta(seconds=1)).isoformat()
        ),
        "time-invalid",
    ),
    "signed_at before cut_time": (
        with_doc(signed_at=(BAD_TIME - timedelta(seconds=1)).isoformat()),
        "time-invalid",
    ),
    "older cut_time": (with_doc(cut_time=minute_ago(40).isoformat()), "time-invalid"),
    # §4.5 files
    "missing file": (incomplete, "incomplete"),
    "tampered file": (tampered(0), "file-mismatch"),
    "wrong size": (tampered(1), "file-mismatch"),
    "symlink in drop folder": (special_file("symlink"), "file-type"),
    "FIFO in drop folder": (special_file("fifo"), "file-type"),
    "symlinked folder in drop folder": (special_file("dirlink"), "file-type"),
    "directory instead of file": (special_file("dir"), "file-type"),
    # §4.6 limits (configured small in the test agent)
    "oversized file": (with_extra_file("grande.bin", lambda: b"x" * 300_000), "limit-exceeded"),
    "too many files": (with_extra_file("otro.txt", lambda: b"x", copies=2), "limit-exceeded"),
    # §4.7 stamps
    "CSV stamp mismatch": (
        with_extra_file("b.csv", lambda: csv_bytes(minute_ago(5))),
        "stamp-mismatch",
    ),
    "zip name mismatch": (
        with_extra_file("20210606_2030_PREP_AYUN.zip", lambda: zip_bytes({"x.txt": b"x"})),
        "stamp-mismatch",
    ),
    "CSV in zip mismatch": (
        with_extra_file("datos.zip", lambda: zip_bytes({"a.csv": csv_bytes(minute_ago(5))})),
        "stamp-mismatch",
    ),
    "zip bomb": (with_extra_file("bomba.zip", bomb), "zip-invalid"),
}


DETAILS = {
    "ssh-rsa SHA-1": "ssh-rsa",
    "RSA 2048": "2048 bits",
    "wrong namespace": "namespace",
    "key for another namespace": "namespace",
    "untrusted key": "not in allowed_signers",
    "embedded trusted key, rogue signature": "does not verify",
    "key expired": "valid",
    "key not yet valid": "valid",
    "flipped signature": "does not verify",
}
"""Why a signature block did not count, for the cases that share a reason class."""


@pytest.fixture
def published(tmp_path: Path) -> tuple[Agent, Path]:
    """An agent (small limits) with sequence 1 published."""
    inst = Institute(tmp_path / "inst")
    config = make_config(tmp_path, inst, max_files=4, max_file_bytes=200_000)
    agent = Agent(config)
    inst.deliver(
        config.inbox,
        inst.files(GOOD_TIME, 2),
        inst.manifest(inst.files(GOOD_TIME, 2), 2, GOOD_TIME),
    )
    assert agent.step(settle=False).status == "published"
    agent.inst = inst  # type: ignore[attr-defined]
    return agent, tmp_path


@pytest.mark.parametrize("name", list(CASES))
def test_bad_cut_is_rejected_and_previous_stays(name: str, published: tuple[Agent, Path]) -> None:
    agent, tmp = published
    case, reason = CASES[name]
    before = tree_digest(agent.config.current)
    current_before = os.readlink(agent.config.current)
    scratch = tmp / "scratch"
    scratch.mkdir()
    case(agent.inst, agent.config.inbox, scratch)  # type: ignore[attr-defined]

    outcome = agent.step(settle=False)

    assert outcome.status == "rejected", outcome
    assert outcome.rejection is not None
    assert outcome.rejection.reason == reason, outcome.rejection
    assert DETAILS.get(name, "") in outcome.rejection.detail
    assert os.readlink(agent.config.current) == current_before
    assert tree_digest(agent.config.current) == before
    assert len(os.listdir(agent.config.releases)) == 1
    quarantined = sorted(agent.config.quarantine.iterdir())
    assert len(quarantined) == 1
    recorded = json.loads((quarantined[0] / "reason.json").read_text())
    assert recorded["reason"] == reason
    state = json.loads(agent.config.state_file.read_text())
    assert state["last_rejection"]["reason"] == reason
    journal = agent.config.journal_file.read_text().splitlines()
    assert json.loads(journal[-1])["event"] == "cut-rejected"
    # Decided once: the same signature is not re-judged on the next rescan.
    assert agent.step(settle=False).status == "idle"


def test_replay_is_a_no_op(published: tuple[Agent, Path]) -> None:
    agent, _ = published
    inst = agent.inst  # type: ignore[attr-defined]
    before = tree_digest(agent.config.current)
    files = inst.files(GOOD_TIME, 2)
    data = (agent.config.current / ".well-known/prep-cut/manifest.json").read_bytes()
    # ed25519 signatures are deterministic: the same bytes re-signed with sha256 differ.
    inst.deliver(
        agent.config.inbox, files, raw=data, sig=ssh_sign(inst.key, data, hashalg="sha256")
    )
    outcome = agent.step(settle=False)
    assert outcome.status == "replay"
    assert tree_digest(agent.config.current) == before
    assert not list(agent.config.quarantine.iterdir())


def test_unlisted_file_is_ignored(published: tuple[Agent, Path]) -> None:
    agent, _ = published
    inst = agent.inst  # type: ignore[attr-defined]
    (agent.config.inbox / "secreto.txt").write_text("no publicar")
    files = inst.files(BAD_TIME, 3)
    inst.deliver(agent.config.inbox, files, inst.manifest(files, 3, BAD_TIME))
    assert agent.step(settle=False).status == "published"
    published_files = set(tree_digest(agent.config.current))
    assert "secreto.txt" not in published_files
    assert published_files == set(files) | {
        ".well-known/prep-cut/manifest.json",
        ".well-known/prep-cut/manifest.json.sig",
    }


def test_oversized_manifest(tmp_path: Path) -> None:
    inst = Institute(tmp_path / "inst")
    config = make_config(tmp_path, inst, max_manifest_bytes=300)
    agent = Agent(config)
    inst.cut(config.inbox, 1)
    outcome = agent.step(settle=False)
    assert outcome.rejection is not None and outcome.rejection.reason == "limit-exceeded"
    assert not config.current.exists()


@pytest.mark.core
def test_case_names_match_reason_classes() -> None:
    reasons = {reason for _, reason in CASES.values()}
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)*", r) for r in reasons)
    assert ELECTION == "coah-ayun-2021"
