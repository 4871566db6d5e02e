"""The institute's evidence kept in a package release, and ``prep-agent verify`` on it.

A signed package's ``.sig`` is kept as published beside ``package.json``, so that
anyone can verify the zip again later with ``ssh-keygen -Y verify``; ``prep-agent
verify`` on an https-package root checks the published release again: its files,
the zip's SHA-256, the package checks and the kept signature against the trust
in force. Real HTTPS on loopback (``tests/kit/https_site.py``), real processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from prep_agent.agent.config import load
from prep_agent.agent.fetch import Fetcher, Settings
from prep_agent.agent.package_store import (
    PACKAGE_INFO,
    PackageInfo,
    build_release,
    release_files,
    release_manifest,
)
from prep_agent.agent.store import Store
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.core.package import inspect_package
from prep_agent.institute.simulation.testca import TestCA
from tests.kit import PREP_AGENT, keygen, ssh_sign
from tests.test_package_checks import CUT_STAMPS, cut_package
from tests.test_package_publish import (  # noqa: F401  # ca: the fixture
    Env,
    ca,
    package_env,
    write_conf,
)

WELL_KNOWN = ".well-known/prep-package"


@pytest.fixture
def env(tmp_path: Path, ca: TestCA) -> Iterator[Env]:  # noqa: F811  # ca: the fixture
    with package_env(tmp_path, ca) as made:
        yield made


def verify(env: Env) -> tuple[int, str]:
    """``prep-agent verify`` of the env's root: exit status and its output line."""
    proc = subprocess.run(
        [PREP_AGENT, "verify", "--config", str(env.conf)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode, (proc.stdout + proc.stderr).strip()


def ssh_keygen_verify(allowed_signers: Path, sig: Path, data: bytes) -> int:
    """The real ``ssh-keygen -Y verify`` of ``sig`` over ``data``, namespace prep-package."""
    args = ["ssh-keygen", "-Y", "verify", "-f", str(allowed_signers), "-I", "iec"]
    args += ["-n", "prep-package", "-s", str(sig)]
    env = {"PATH": "/usr/bin:/bin", "HOME": str(sig.parent), "LC_ALL": "C"}
    return subprocess.run(args, input=data, capture_output=True, env=env, check=False).returncode


def test_the_fetcher_returns_the_sig_bytes_of_a_signed_package_only(env: Env) -> None:
    name, data = cut_package(CUT_STAMPS[0])
    sig = ssh_sign(env.institute.key, data, namespace="prep-package")
    env.offer(name, data, sig)
    signers = parse_allowed_signers(env.institute.allowed_signers.read_text())
    settings = Settings(env.site.url("/paquetes/"), ca_file=env.site.ca_file)
    package = Fetcher(settings, signers).poll(datetime.now(timezone.utc))
    assert package is not None and package.signed_by and package.signature == sig
    env.offer(name, data)
    package = Fetcher(settings, signers).poll(datetime.now(timezone.utc))
    assert package is not None and package.signed_by is None and package.signature is None


def test_a_signed_release_keeps_the_sig_and_verify_checks_it_again(env: Env) -> None:
    name, data = cut_package(CUT_STAMPS[0])
    sig = ssh_sign(env.institute.key, data, namespace="prep-package")
    env.offer(name, data, sig)
    assert env.once() == (0, "published: sequence 202106062240")
    release = env.current()
    kept = release / WELL_KNOWN / f"{name}.sig"
    assert kept.read_bytes() == sig
    info = json.loads((release / WELL_KNOWN / "package.json").read_bytes())
    assert info["signature"] == f"{WELL_KNOWN}/{name}.sig" and info["signed"] is True
    manifest = json.loads((release / ".well-known/prep-cut/manifest.json").read_bytes())
    assert f"{WELL_KNOWN}/{name}.sig" in {f["path"] for f in manifest["files"]}
    # Anyone can verify the zip again, with OpenSSH alone.
    zipped = (release / "paquete" / name).read_bytes()
    assert ssh_keygen_verify(env.institute.allowed_signers, kept, zipped) == 0

    code, out = verify(env)
    fingerprint = info["signed_by"][0]
    assert (code, out) == (
        0,
        f"verified: sequence 202106062240, package {name} (sha256 {info['sha256']}), "
        f"{len(manifest['files'])} files, signed by {fingerprint}",
    )
    # The trust changes: the kept signature no longer counts.
    other = env.tmp / "otra_clave"
    trusted = env.institute.allowed_signers.read_text()
    env.institute.allowed_signers.write_text(
        f'iec namespaces="prep-cut,prep-package" {keygen(other)}\n'
    )
    code, out = verify(env)
    assert code == 3 and out.startswith(
        "rejected: signature-untrusted: the kept .sig: signed by 0/1 required trusted keys"
    )
    env.institute.allowed_signers.write_text(trusted)
    assert verify(env)[0] == 0
    # A file of the release changed on disk since publication.
    csv = next((release / "archivos").rglob("*.csv"))
    os.chmod(csv.parent, 0o755)
    os.chmod(csv, 0o644)
    csv.write_bytes(csv.read_bytes().replace(b"1", b"7", 1))
    code, out = verify(env)
    path = csv.relative_to(release).as_posix()
    assert (code, out) == (3, f"rejected: file-mismatch: {path} changed since it was published")


def test_an_unsigned_release_keeps_no_sig_and_verifies_as_unsigned(env: Env) -> None:
    code, out = verify(env)
    assert code != 0 and "nothing to verify" in out and "\n" not in out
    name, data = cut_package(CUT_STAMPS[0])
    env.offer(name, data)
    assert env.once()[0] == 0
    release = env.current()
    assert not (release / WELL_KNOWN / f"{name}.sig").exists()
    info = json.loads((release / WELL_KNOWN / "package.json").read_bytes())
    assert info["signature"] is None and info["signed"] is False
    code, out = verify(env)
    assert code == 0 and out.startswith("verified: sequence 202106062240, ")
    assert out.endswith(" files, unsigned")
    # The kept zip changed: its SHA-256 is no longer package.json's.
    zipped = release / "paquete" / name
    os.chmod(zipped.parent, 0o755)
    os.chmod(zipped, 0o644)
    with open(zipped, "r+b") as fh:
        fh.seek(40)
        fh.write(b"\0")
    code, out = verify(env)
    assert (code, out) == (
        3,
        f"rejected: file-mismatch: paquete/{name} changed since it was published",
    )


def test_a_rejected_signed_package_is_quarantined_with_its_sig(env: Env) -> None:
    name, data = cut_package(CUT_STAMPS[1])
    env.offer(name, data, ssh_sign(env.institute.key, data, namespace="prep-package"))
    assert env.once()[0] == 0
    old_name, old = cut_package(CUT_STAMPS[0])
    old_sig = ssh_sign(env.institute.key, old, namespace="prep-package")
    env.offer(old_name, old, old_sig)
    code, out = env.once()
    assert code == 3 and out.startswith("rejected: rollback: ")
    entry = env.quarantined()[-1]
    assert (entry / old_name).read_bytes() == old
    assert (entry / f"{old_name}.sig").read_bytes() == old_sig


def test_a_release_that_kept_no_sig_verifies_with_the_signers_it_recorded(env: Env) -> None:
    """A release built before the agent kept the ``.sig`` (package.json without
    ``signature``) is checked in all else and reported as signed when published."""
    name, data = cut_package(CUT_STAMPS[0])
    env.offer(name, data)
    assert env.once()[0] == 0  # the root's layout and state
    config = load(env.conf)
    store = Store(config.layout, config.limits)
    package = inspect_package(name, data)
    sha256 = hashlib.sha256(data).hexdigest()
    info = PackageInfo(
        name, sha256, package.stamp.isoformat(), package.sequence, "127.0.0.1", "", ("SHA256:x",)
    )
    files = release_files(package, info, data)
    doc = json.loads(files[PACKAGE_INFO])
    del doc["signature"]
    files[PACKAGE_INFO] = json.dumps(doc).encode()
    store.swap(build_release(store, files, release_manifest(config, package, files)).name)
    code, out = verify(env)
    assert code == 0, out
    assert out.endswith(" files, signed by SHA256:x when published (no .sig kept to check again)")
