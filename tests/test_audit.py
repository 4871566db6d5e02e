"""``prep-agent audit``: a difusor's public copy checked from outside (issue 17).

A real agent publishes real signed cuts, served by its embedded server and by
the packaged nginx site; each test spoils one cut the way a broken or hostile
difusor would (a file changed on disk as root, a file removed, an old cut, a
manifest re-signed by another key) or puts a hostile front (``tests.auditkit``)
before it (an HTML error page with 200, a slow answer, an endless body, other
caching headers), and the audit must report exactly that, with its exit code.
Each test publishes a cut of its own, with bytes no other cut shares (releases
hard-link files they share, and the embedded server keeps release files it
served in memory).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from prep_agent.agent.config import Config
from prep_agent.cli.main import main
from prep_agent.core.errors import (
    EXIT_AUDIT_ALTERED,
    EXIT_AUDIT_STALE,
    EXIT_AUDIT_UNREACHABLE,
    EXIT_OK,
)
from prep_agent.core.manifest import Limits, parse_manifest
from prep_agent.core.protocol import CACHE_FRAME, CACHE_RELEASE
from prep_agent.institute.audit.check import choose_files
from tests.auditkit import ENDLESS, ERROR_PAGE, HTML_ERROR, HUGE, NO_CACHE, SLOW, Front
from tests.kit import (
    PREP_AGENT,
    Institute,
    csv_bytes,
    keygen,
    minute_ago,
    ssh_sign,
    wait_for,
)
from tests.nginxkit import serving_agent, wait_published

pytestmark = pytest.mark.timeout(90)

CSV = "datos/COAH_AYUN_2021.csv"
ODD = "datos/Torreón 2021.txt"
"""A path with a space and an accent: the audit must quote it as the frame does."""


@dataclass
class Difusor:
    """A running agent, optionally behind nginx; ``url`` is where the public reads it."""

    config: Config
    url: str
    institute: Institute
    sequence: int = 0
    files: dict[int, dict[str, bytes]] = field(default_factory=dict)
    cut_times: dict[int, str] = field(default_factory=dict)

    def publish(self) -> str:
        """Deliver a new cut whose files no other cut shares; return its release name."""
        self.sequence += 1
        seq = self.sequence
        when = minute_ago(100 - seq)
        files = {
            "index.html": f"<h1>Corte {seq}</h1>".encode(),
            CSV: csv_bytes(when, seq + 3),
            "img/logo.svg": f"<svg xmlns='http://www.w3.org/2000/svg' id='c{seq}'/>".encode(),
            ODD: f"corte {seq}\n".encode() * 40,
            **{f"extra/{i}.json": json.dumps({"corte": seq, "i": i}).encode() for i in range(4)},
        }
        self.files[seq] = files
        doc = self.institute.manifest(files, seq, when)
        self.cut_times[seq] = doc["cut_time"]
        self.institute.deliver(self.config.inbox, files, doc)
        release = str(wait_published(self.config.public, seq)["release"])
        # The servers re-read status.json and the frame within a second or so.
        wait_for(lambda: self.serves(doc["cut_time"]), 10, f"{self.url} serving cut {seq}")
        return release

    def serves(self, cut_time: str) -> bool:
        """Whether the public status.json and frame both show ``cut_time`` now."""
        status = json.loads(http_get(f"{self.url}/status.json"))
        frame = http_get(f"{self.url}/").decode()
        return bool(status["cut_time"] == cut_time and f'datetime="{cut_time}"' in frame)

    def release_file(self, release: str, path: str) -> Path:
        """A file of a published release, made writable (as root would)."""
        target = self.config.releases / release / path
        target.chmod(0o644)
        return target


def http_get(url: str) -> bytes:
    """The body of a GET of ``url``."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        body: bytes = answer.read()
    return body


@contextlib.contextmanager
def running(tmp: Path, institute: Institute, kind: str) -> Iterator[Difusor]:
    with serving_agent(tmp, institute, kind) as served:
        yield Difusor(served.config, served.url, institute)


@pytest.fixture(scope="module", params=["embedded", "nginx"])
def difusor(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, institute: Institute
) -> Iterator[Difusor]:
    with running(tmp_path_factory.mktemp(f"audit-{request.param}"), institute, request.param) as d:
        yield d


def audit(
    capsys: pytest.CaptureFixture[str], url: str, trust: Path, *options: str
) -> tuple[int, dict[str, Any]]:
    """Run ``prep-agent audit --json`` in-process; return its exit status and report."""
    code = main(["audit", url, "--trust", str(trust), "--json", *options])
    out = capsys.readouterr().out
    return code, json.loads(out)


def lines(report: dict[str, Any]) -> list[str]:
    return [f"{f['path']}: expected {f['expected']}, got {f['got']}" for f in report["findings"]]


# --- an untouched copy ---------------------------------------------------------------


def test_untouched_copy_audits_clean(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    release = difusor.publish()
    code, report = audit(
        capsys, difusor.url, institute.allowed_signers, "--election", "coah-ayun-2021"
    )
    assert code == EXIT_OK, lines(report)
    assert report["verdict"] == "intact" and report["findings"] == []
    assert report["release"] == release and report["sequence"] == difusor.sequence
    assert report["checked"] == report["listed"] == len(difusor.files[difusor.sequence])
    # The installed command agrees, in its plain output.
    done = subprocess.run(
        [PREP_AGENT, "audit", difusor.url, "--trust", str(institute.allowed_signers)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_OK, done.stdout + done.stderr
    assert done.stdout.startswith(f"intact: sequence {difusor.sequence}, 8/8 files checked")


def test_sample_fetches_the_entry_the_stamped_files_and_n_more(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    difusor.publish()
    code, report = audit(capsys, difusor.url, institute.allowed_signers, "--sample", "2")
    assert code == EXIT_OK, lines(report)
    assert (report["checked"], report["listed"]) == (2 + 2, 8)


# --- the difusor's own disk ----------------------------------------------------------


def test_files_changed_on_disk_after_publication(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    release = difusor.publish()
    original = difusor.files[difusor.sequence][CSV]
    with difusor.release_file(release, CSV).open("r+b") as fh:  # same size, one byte off
        fh.seek(len(original) - 3)
        fh.write(b"9")
    with difusor.release_file(release, ODD).open("ab") as fh:
        fh.write(b"<script>alert(1)</script>")
    code, report = audit(capsys, difusor.url, institute.allowed_signers)
    assert code == EXIT_AUDIT_ALTERED and report["verdict"] == "altered"
    base = f"cortes/{release}"
    altered = bytearray(original)
    altered[len(original) - 3] = ord("9")
    size = len(difusor.files[difusor.sequence][ODD])
    assert sorted(lines(report)) == sorted(
        [
            f"{base}/{CSV}: expected sha256 {hashlib.sha256(original).hexdigest()}, "
            f"got sha256 {hashlib.sha256(altered).hexdigest()}",
            f"{base}/{ODD}: expected {size} bytes, got {size + 25} bytes (Content-Length)",
        ]
    )


def test_file_missing(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    release = difusor.publish()
    difusor.release_file(release, "img/logo.svg").unlink()
    code, report = audit(capsys, difusor.url, institute.allowed_signers)
    assert code == EXIT_AUDIT_ALTERED
    assert lines(report) == [f"cortes/{release}/img/logo.svg: expected 200 OK, got HTTP 404"]


def test_stale_copy(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    difusor.publish()
    seq = difusor.sequence
    newest = str(seq + 1)
    code, report = audit(
        capsys, difusor.url, institute.allowed_signers, "--expect-sequence", newest
    )
    assert code == EXIT_AUDIT_STALE and report["verdict"] == "stale"
    assert len(report["findings"]) == 1
    assert lines(report)[0].startswith(
        f"status.json: expected sequence {seq + 1} or newer, got sequence {seq} ("
    )
    code, report = audit(
        capsys, difusor.url, institute.allowed_signers, "--expect-sequence", str(seq)
    )
    assert code == EXIT_OK, lines(report)


def test_manifest_signed_by_another_key(
    difusor: Difusor,
    institute: Institute,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The difusor alters a file, rewrites the manifest to match and signs it itself:
    the audit reports the signature and trusts nothing else of that manifest."""
    release = difusor.publish()
    other = tmp_path / "other"
    keygen(other)
    well_known = f"{release}/.well-known/prep-cut"
    manifest_file = difusor.config.releases / well_known / "manifest.json"
    doc = json.loads(manifest_file.read_bytes())
    forged = b"<h1>Otro resultado</h1>"
    difusor.release_file(release, "index.html").write_bytes(forged)
    for entry in doc["files"]:
        if entry["path"] == "index.html":
            entry.update(size=len(forged), sha256=hashlib.sha256(forged).hexdigest())
    data = json.dumps(doc, indent=1).encode()
    manifest_file.chmod(0o644)
    manifest_file.write_bytes(data)
    sig_file = difusor.config.releases / well_known / "manifest.json.sig"
    sig_file.chmod(0o644)
    sig_file.write_bytes(ssh_sign(other, data))
    code, report = audit(capsys, difusor.url, institute.allowed_signers)
    assert code == EXIT_AUDIT_ALTERED
    assert [f["path"] for f in report["findings"]] == [f"cortes/{well_known}/manifest.json.sig"]
    assert "signature-untrusted: signed by 0/1" in report["findings"][0]["got"]
    assert report["checked"] == 0 and report["sequence"] is None


def test_frame_showing_another_cut(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    difusor.publish()
    old_frame = (difusor.config.public / "index.html").read_bytes()
    difusor.publish()
    tmp = difusor.config.public / "index.html.old"
    tmp.write_bytes(old_frame)
    tmp.replace(difusor.config.public / "index.html")
    old, new = (difusor.cut_times[difusor.sequence - d] for d in (1, 0))
    wait_for(lambda: old.encode() in http_get(f"{difusor.url}/"), 10, "the old frame served")
    code, report = audit(capsys, difusor.url, institute.allowed_signers)
    assert code == EXIT_AUDIT_ALTERED
    assert lines(report) == [f"/ (frame): expected cut time {new}, got {old}"]


def test_a_cut_published_during_the_audit_is_no_alteration(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    """status.json read just before a publication, the frame just after: the frame
    shows a newer signed cut, which status.json names when read again."""
    difusor.publish()
    before = http_get(f"{difusor.url}/status.json")
    difusor.publish()
    with Front(difusor.url) as front:
        front.once["/status.json"] = before
        code, report = audit(capsys, front.url, institute.allowed_signers)
    assert code == EXIT_OK, lines(report)
    assert report["sequence"] == difusor.sequence - 1 and report["findings"] == []


# --- a hostile front -----------------------------------------------------------------


def test_html_error_page_with_200(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    release = difusor.publish()
    with Front(difusor.url) as front:
        front.spoiled[f"/cortes/{release}/{CSV}"] = HTML_ERROR
        code, report = audit(capsys, front.url, institute.allowed_signers)
        assert code == EXIT_AUDIT_ALTERED
        size = len(difusor.files[difusor.sequence][CSV])
        assert lines(report) == [
            f"cortes/{release}/{CSV}: expected {size} bytes, got {len(ERROR_PAGE)} bytes",
            f"cortes/{release}/{CSV}: expected Cache-Control {CACHE_RELEASE}, got (none)",
        ]
        front.spoiled["/status.json"] = HTML_ERROR
        code, report = audit(capsys, front.url, institute.allowed_signers)
    assert code == EXIT_AUDIT_ALTERED
    assert lines(report) == [
        f"status.json: expected a prep-status/1 document, got text/html, {len(ERROR_PAGE)} bytes",
        f"status.json: expected Cache-Control {CACHE_FRAME}, got (none)",
    ]


def test_status_json_nested_past_the_parser_depth(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    with Front(difusor.url) as front:
        front.bodies["/status.json"] = b"[" * 60_000
        code, report = audit(capsys, front.url, institute.allowed_signers)
    assert code == EXIT_AUDIT_ALTERED
    assert lines(report)[0] == (
        "status.json: expected a prep-status/1 document, got application/json, 60000 bytes"
    )


def test_slow_difusor_times_out(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    release = difusor.publish()
    with Front(difusor.url) as front:
        front.spoiled[f"/cortes/{release}/extra/2.json"] = SLOW
        size = len(difusor.files[difusor.sequence]["extra/2.json"])
        started = time.monotonic()
        code, report = audit(capsys, front.url, institute.allowed_signers, "--timeout", "1")
        took = time.monotonic() - started
    assert code == EXIT_AUDIT_UNREACHABLE and report["verdict"] == "unreachable", lines(report)
    assert lines(report) == [f"cortes/{release}/extra/2.json: expected {size} bytes, got timeout"]
    assert took < 6, f"the audit took {took:.1f} s with --timeout 1"


def test_huge_answers_are_cut_short(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    release = difusor.publish()
    files = difusor.files[difusor.sequence]
    with Front(difusor.url) as front:
        front.spoiled[f"/cortes/{release}/extra/1.json"] = HUGE
        front.spoiled[f"/cortes/{release}/extra/3.json"] = ENDLESS
        code, report = audit(capsys, front.url, institute.allowed_signers)
        sent = front.sent
    assert code == EXIT_AUDIT_ALTERED
    one, three = len(files["extra/1.json"]), len(files["extra/3.json"])
    assert sorted(lines(report)) == [
        f"cortes/{release}/extra/1.json: expected {one} bytes, "
        "got 10000000000 bytes (Content-Length)",
        f"cortes/{release}/extra/3.json: expected {three} bytes, got more than {three} bytes",
    ]
    # The front wrote into the socket buffers, no more: the auditor stopped reading.
    assert sent < 64 * 1024**2, sent


def test_other_caching_headers(
    difusor: Difusor, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    release = difusor.publish()
    with Front(difusor.url) as front:
        for path in difusor.files[difusor.sequence]:
            front.spoiled[f"/cortes/{release}/{quote(path)}"] = NO_CACHE
        code, report = audit(capsys, front.url, institute.allowed_signers)
    assert code == EXIT_AUDIT_ALTERED
    assert len(report["findings"]) == 1, lines(report)
    finding = report["findings"][0]
    assert finding["path"].endswith("(and 7 more)")
    assert (finding["expected"], finding["got"]) == (
        "Cache-Control public, max-age=31536000, immutable",
        "no-cache",
    )


# --- pure parts ----------------------------------------------------------------------


@pytest.mark.core
def test_choose_files_keeps_the_entry_and_the_stamped_files() -> None:
    files = [{"path": f"p/{i}.html", "size": 1, "sha256": "0" * 64} for i in range(50)]
    files += [{"path": n, "size": 1, "sha256": "1" * 64} for n in ("a.CSV", "b/c.zip")]
    doc = {
        "format": "prep-cut/1",
        "election": "coah-ayun-2021",
        "sequence": 1,
        "cut_time": "2021-06-06T20:30:00-05:00",
        "signed_at": "2021-06-06T20:31:00-05:00",
        "entry": "p/7.html",
        "files": files,
    }
    manifest = parse_manifest(json.dumps(doc).encode(), Limits())
    chosen = [f.path for f in choose_files(manifest, 5, random.Random(1))]
    assert chosen[:3] == ["p/7.html", "a.CSV", "b/c.zip"] and len(set(chosen)) == 8
    assert len(choose_files(manifest, None, random.Random(1))) == 52
    assert len(choose_files(manifest, 500, random.Random(1))) == 52


# --- CORS: the institute's verifier page reads the public files from its own origin ---


def test_public_files_allow_cross_origin_get_only(difusor: Difusor) -> None:
    release = difusor.publish()
    origin = {"Origin": "https://verificador.iec.example.mx"}
    public = [
        "/",
        "/status.json",
        "/static/frame.js",
        f"/cortes/{release}/{quote(CSV)}",
        f"/cortes/{release}/.well-known/prep-cut/manifest.json.sig",
    ]
    for path in public:
        answer = requests.get(difusor.url + path, headers=origin, timeout=5)
        assert answer.status_code == 200, path
        assert answer.headers.get("Access-Control-Allow-Origin") == "*", path
    missing = requests.get(f"{difusor.url}/cortes/{release}/no-existe.csv", timeout=5)
    assert missing.status_code == 404 and missing.headers["Access-Control-Allow-Origin"] == "*"
    elsewhere = requests.get(f"{difusor.url}/state.json", timeout=5)
    assert elsewhere.status_code == 404
    assert "Access-Control-Allow-Origin" not in elsewhere.headers
    health = requests.get(difusor.url + "/health", headers=origin, timeout=5)
    assert "Access-Control-Allow-Origin" not in health.headers
    for method in ("POST", "OPTIONS", "PUT"):
        answer = requests.request(method, difusor.url + "/status.json", headers=origin, timeout=5)
        assert answer.status_code == 405, method
