"""The https-package source through the real daemon: fetched, checked, published.

A real HTTPS server on loopback (``tests/kit/https_site.Site``, a test CA) serves
the real Campeche 2021 cuts as ``YYYYMMDD_HHMM_PREP_CAMP.zip`` packages from a
folder whose autoindex names them; the agent is the real ``prep-agent run``
command (``--once`` per poll, or the daemon). Everything is checked from outside:
exit codes, the release on disk, status.json, the frame, the journal, quarantine.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from prep_agent.agent.config import render_template
from prep_agent.institute.simulation.testca import TestCA, issue, make_ca, write_server_files
from prep_agent.report.incidents import read_incidents
from tests.kit import (
    PREP_AGENT,
    AgentDaemon,
    Institute,
    keygen,
    ssh_sign,
    status_json,
    wait_for,
)
from tests.kit.https_site import Site
from tests.test_package_checks import CUT_STAMPS, cut_members, cut_package, zip_bytes

ELECTION = "camp-2021"


@dataclass
class Env:
    """One agent root fed by one HTTPS folder."""

    tmp: Path
    site: Site
    conf: Path
    institute: Institute

    @property
    def root(self) -> Path:
        return self.tmp / "root"

    @property
    def folder(self) -> Path:
        return self.site.folder / "paquetes"

    def offer(self, name: str, data: bytes, sig: bytes | None = None) -> None:
        """Make ``name`` the only package the institute's folder lists."""
        for old in self.folder.iterdir():
            old.unlink()
        if sig is not None:
            (self.folder / f"{name}.sig").write_bytes(sig)
        (self.folder / name).write_bytes(data)

    def once(self) -> tuple[int, str]:
        """``prep-agent run --once``: exit status and its output line."""
        proc = subprocess.run(
            [PREP_AGENT, "run", "--once", "--config", str(self.conf)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return proc.returncode, proc.stdout.strip()

    def current(self) -> Path:
        return (self.root / "current").resolve()

    def journal(self) -> list[dict[str, Any]]:
        lines = (self.root / "journal.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def quarantined(self) -> list[Path]:
        return sorted((self.root / "quarantine").iterdir())


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return make_ca()


def write_conf(tmp: Path, site: Site, institute: Institute, poll_seconds: int = 30) -> Path:
    """An agent config whose ``[source]`` polls the site's ``/paquetes/`` folder."""
    text = render_template(
        election=ELECTION,
        root=tmp / "root",
        inbox=tmp / "inbox",
        trust=institute.allowed_signers,
        threshold=1,
        listen="127.0.0.1:0",
        source_type="https-package",
        source_url=site.url("/paquetes/"),
        ca_file=site.ca_file,
    )
    source = text.index("[source]")
    text = text[:source] + text[source:].replace(
        "poll_seconds = 30", f"poll_seconds = {poll_seconds}"
    )
    conf = tmp / "prep-agent.conf"
    conf.write_text(text)
    return conf


@contextmanager
def package_env(tmp_path: Path, ca: TestCA) -> Iterator[Env]:
    """A loopback HTTPS site serving ``/paquetes/`` (certificate from ``ca``), an
    institute trusted for cuts and packages, and an agent config polling the site."""
    ca_path, cert, key = write_server_files(tmp_path / "tls", ca, issue(ca))
    (tmp_path / "www" / "paquetes").mkdir(parents=True)
    site = Site(tmp_path / "www", cert, key, ca_path)
    institute = Institute(tmp_path / "institute")
    institute.allowed_signers.write_text(
        f'iec namespaces="prep-cut,prep-package" {institute.public}\n'
    )
    try:
        yield Env(tmp_path, site, write_conf(tmp_path, site, institute), institute)
    finally:
        site.close()


@pytest.fixture
def env(tmp_path: Path, ca: TestCA) -> Iterator[Env]:
    with package_env(tmp_path, ca) as made:
        yield made


def unzipped(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {i.filename: archive.read(i) for i in archive.infolist() if not i.is_dir()}


def tree(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_release_of(env: Env, name: str, data: bytes, signed: bool = False) -> Path:
    """``current`` holds ``data`` and its entries byte-identical, the pages beside
    them, and the package's metadata."""
    release = env.current()
    assert (release / "paquete" / name).read_bytes() == data
    for path, member in unzipped(data).items():
        assert (release / "archivos" / path).read_bytes() == member, path
    index = (release / "resultados" / "index.html").read_text()
    assert "generada por el difusor" in index
    links = [unquote(h) for h in re.findall(r'href="(\.\./archivos/[^"]+)"', index)]
    assert sorted(links) == sorted(f"../archivos/{path}" for path in unzipped(data))
    assert all((release / "resultados" / link).is_file() for link in links)
    info = json.loads((release / ".well-known/prep-package/package.json").read_bytes())
    assert info["name"] == name and info["sha256"] == hashlib.sha256(data).hexdigest()
    assert info["host"] == "127.0.0.1" and info["signed"] is signed
    return release


def test_the_campeche_series_in_order_then_rollback_replay_and_equivocation(env: Env) -> None:
    packages = [cut_package(cut) for cut in CUT_STAMPS]
    for name, data in packages:
        env.offer(name, data)
        code, out = env.once()
        sequence = int(name[:8] + name[9:13])
        assert (code, out) == (0, f"published: sequence {sequence}")
        assert_release_of(env, name, data)
    newest_name, newest = packages[-1]
    published = tree(env.current())
    status = json.loads((env.root / "public" / "status.json").read_bytes())
    assert status["sequence"] == 202106072000
    assert status["cut_time"] == "2021-06-07T20:00:00-05:00"
    assert status["source"]["host"] == "127.0.0.1" and status["source"]["signed"] is False
    # Freshness by the same rules, the period from [source] cut_period_seconds (600).
    assert status["period_seconds"] == 600 and status["state"] == "stale"
    assert status["stale_at"] == "2021-06-07T20:30:00-05:00"
    frame = (env.root / "public" / "index.html").read_text()
    assert "07/06/2021 20:00 h (UTC-5)" in frame
    assert "Origen: paquete del instituto descargado de 127.0.0.1 (sin firma)" in frame
    assert '<p class="notice interrupted" id="stale-notice" role="alert">' in frame
    doc = status_json(env.conf)
    assert doc["sequence"] == 202106072000 and doc["cut_time"] == "2021-06-07T20:00:00-05:00"
    assert doc["source"]["type"] == "https-package" and doc["source"]["signed"] is False

    # Out of order: an older cut is a rollback, quarantined with its zip.
    old_name, old = packages[1]
    env.offer(old_name, old)
    code, out = env.once()
    assert code == 3 and out.startswith("rejected: rollback: 20210606_2320_PREP_CAMP.zip")
    assert tree(env.current()) == published
    entry = env.quarantined()[-1]
    assert (entry / old_name).read_bytes() == old
    assert json.loads((entry / "reason.json").read_bytes())["reason"] == "rollback"

    # Replayed: the published package again, by a new process (no validators kept).
    env.offer(newest_name, newest)
    assert env.once() == (0, "replay: sequence 202106072000")
    assert tree(env.current()) == published

    # Same stamp, other bytes: an equivocation, quarantined and alarmed.
    other = zip_bytes({**cut_members(CUT_STAMPS[-1]), "LEEME.txt": b"otra version\n"})
    env.offer(newest_name, other)
    code, out = env.once()
    assert code == 3 and out.startswith("rejected: equivocation: 20210607_2000_PREP_CAMP.zip")
    assert tree(env.current()) == published
    entry = env.quarantined()[-1]
    assert (entry / newest_name).read_bytes() == other
    assert json.loads((entry / "reason.json").read_bytes())["reason"] == "equivocation"
    rejected = [e for e in env.journal() if e["event"] == "cut-rejected"]
    assert [e["reason"] for e in rejected] == ["rollback", "equivocation"]
    assert rejected[-1]["package_sha256"] == hashlib.sha256(other).hexdigest()
    assert status_json(env.conf)["last_rejection"]["reason"] == "equivocation"
    # The same bytes again are not decided (nor quarantined) twice.
    assert env.once() == (0, "idle")
    assert len(env.quarantined()) == 2


@pytest.mark.parametrize(
    ("member", "size", "reason", "words"),
    [
        ("../../fuera.txt", 1, "path-invalid", "path traversal"),
        ("relleno.txt", 4 * 1024**2, "zip-invalid", "(a zip bomb)"),
    ],
    ids=["traversal", "zip-bomb"],
)
def test_an_unsafe_package_is_quarantined_and_the_cut_keeps_serving(
    env: Env, member: str, size: int, reason: str, words: str
) -> None:
    name, data = cut_package(CUT_STAMPS[0])
    env.offer(name, data)
    assert env.once()[0] == 0
    published = tree(env.current())
    bad_name = "20210608_0000_PREP_CAMP.zip"
    members = {**cut_members(CUT_STAMPS[-1]), member: b"0" * size}
    bad = zip_bytes(members)
    env.offer(bad_name, bad)
    code, out = env.once()
    assert code == 3 and out.startswith(f"rejected: {reason}: ") and words in out
    assert tree(env.current()) == published
    entry = env.quarantined()[-1]
    assert entry.name.endswith("-202106080000")
    assert (entry / bad_name).read_bytes() == bad
    assert json.loads((entry / "reason.json").read_bytes())["reason"] == reason
    assert status_json(env.conf)["last_rejection"]["sequence"] == 202106080000
    status = json.loads((env.root / "public" / "status.json").read_bytes())
    assert status["sequence"] == 202106062240


def test_a_bad_signature_or_a_failing_server_gives_its_reason_and_the_cut_keeps_serving(
    env: Env,
) -> None:
    name, data = cut_package(CUT_STAMPS[0])
    env.offer(name, data)
    assert env.once()[0] == 0
    published = tree(env.current())
    other = env.tmp / "other_key"
    keygen(other)
    newer_name, newer = cut_package(CUT_STAMPS[1])
    env.offer(newer_name, newer, ssh_sign(other, newer, namespace="prep-package"))
    code, out = env.once()
    assert code == 3 and out.startswith("rejected: signature-untrusted: signed by 0/1")
    assert status_json(env.conf)["last_rejection"]["reason"] == "signature-untrusted"
    env.site.routes["/paquetes/"] = lambda h: h.answer(500, b"<h1>Error interno</h1>")
    code, out = env.once()
    assert code == 2 and out.startswith("source-error: source-http-status: HTTP 500 from")
    assert tree(env.current()) == published
    journal = env.journal()
    events = [e["event"] for e in journal]
    assert events.count("cut-rejected") == 1 and events.count("source-error") == 1
    window = (datetime.now(timezone.utc) - timedelta(hours=1), datetime.now(timezone.utc))
    incidents = read_incidents(journal, window)
    assert [r["reason"] for r in incidents.rejected] == ["signature-untrusted"]
    assert [o["event"] for o in incidents.other] == ["source-error"]
    assert [c.sequence for c in incidents.cuts] == [202106062240]


def test_the_daemon_polls_publishes_signed_packages_and_serves_the_frame(env: Env) -> None:
    conf = write_conf(env.tmp, env.site, env.institute, poll_seconds=1)
    first_name, first = cut_package(CUT_STAMPS[-2])
    env.offer(first_name, first)
    agent = AgentDaemon(conf).start(timeout=30)
    try:
        wait_for(lambda: agent.status()["sequence"] == 202106071440, 30, "the first cut")
        name, data = cut_package(CUT_STAMPS[-1])
        sig = ssh_sign(env.institute.key, data, namespace="prep-package")
        env.offer(name, data, sig)
        wait_for(lambda: agent.status()["sequence"] == 202106072000, 30, "the signed cut")
        assert_release_of(env, name, data, signed=True)
        with urlopen(f"http://{agent.address}/") as answer:
            frame = answer.read().decode()
        assert "07/06/2021 20:00 h (UTC-5)" in frame
        assert "descargado de 127.0.0.1 (firmado por el instituto)" in frame
        with urlopen(f"http://{agent.address}/status.json") as answer:
            status = json.loads(answer.read())
        assert status["source"]["signed"] is True
        with urlopen(f"http://{agent.address}/{status['entry']}") as answer:
            assert b"Resultados preliminares" in answer.read()
        original = f"http://{agent.address}/cortes/{status['release']}/paquete/{name}"
        with urlopen(original) as answer:
            assert answer.read() == data
    finally:
        assert agent.stop() == 0
    published = [e for e in agent.journal() if e["event"] == "cut-published"]
    assert [e["sequence"] for e in published] == [202106071440, 202106072000]
    assert published[-1]["signed"] is True and published[-1]["source_host"] == "127.0.0.1"


def urlopen(url: str) -> Any:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return opener.open(url, timeout=10)


def audit(env: Env) -> str | None:
    """The cut ``current`` names, after checking every file its manifest lists."""
    link = env.root / "current"
    if not link.is_symlink():
        return None
    release = env.current()
    manifest = json.loads((release / ".well-known/prep-cut/manifest.json").read_bytes())
    listed = {f["path"]: f for f in manifest["files"]}
    on_disk = tree(release)
    assert set(on_disk) == {*listed, ".well-known/prep-cut/manifest.json"}
    for path, item in listed.items():
        assert hashlib.sha256(on_disk[path]).hexdigest() == item["sha256"], path
    info = json.loads(on_disk[".well-known/prep-package/package.json"])
    zipped = on_disk[f"paquete/{info['name']}"]
    assert hashlib.sha256(zipped).hexdigest() == info["sha256"]
    return str(info["name"])


def kill_while_building(env: Env, extra: float) -> bool:
    """Run ``run --once`` and SIGKILL it ``extra`` seconds after its release appears
    in ``staging/``; return whether the kill left a partial release there."""
    agent = AgentDaemon(env.conf, once=True).spawn()
    staging = env.root / "staging"
    assert agent.proc is not None
    try:
        wait_for(
            lambda: any(staging.iterdir()) or agent.proc.poll() is not None,  # type: ignore[union-attr]
            30,
            "a release being built",
            interval=0.001,
        )
        time.sleep(extra)
    finally:
        agent.kill()
    return any(staging.iterdir())


def test_kill_9_during_publication_leaves_the_old_or_the_new_cut_complete(env: Env) -> None:
    old_name, old = cut_package(CUT_STAMPS[0])
    env.offer(old_name, old)
    assert env.once()[0] == 0
    new_name = f"{CUT_STAMPS[-1]}_PREP_CAMP.zip"
    filler = random.Random(15).randbytes(8 * 1024**2)  # a build long enough to interrupt
    new = zip_bytes({**cut_members(CUT_STAMPS[-1]), "anexos/relleno.bin": filler})
    env.offer(new_name, new)
    seen: list[tuple[float, bool, str | None]] = []
    for extra in (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
        partial = kill_while_building(env, extra)
        seen.append((extra, partial, audit(env)))
        if seen[-1][2] == new_name:
            break
    assert {name for _, _, name in seen} <= {old_name, new_name}, seen
    # At least one kill hit a half-built release, and the old cut still served.
    assert any(partial and name == old_name for _, partial, name in seen), seen
    code, out = env.once()
    done = ("published: sequence 202106072000", "replay: sequence 202106072000", "idle")
    assert code == 0 and out in done
    assert audit(env) == new_name
    assert status_json(env.conf)["sequence"] == 202106072000
    assert not any((env.root / "staging").iterdir())
