"""The institute's verifier page (prep_agent/institute/audit/static) in headless Chromium.

The page is served from its own origin (the institute's site: a ``python -m
http.server`` with the page and the institute's ``allowed_signers``); it reads
a real agent's public files across origins (the agent's CORS header), verifies
the manifest's SSHSIG with WebCrypto and each file's SHA-256, and must reach
the same verdict, on the same files, as ``prep-agent audit`` on an untouched
copy, a file changed on disk, a file removed, a manifest re-signed by another
key and a stale copy; for Ed25519, ECDSA P-256 and RSA 3072 institutes alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from prep_agent.cli.main import main
from tests.browserkit import CHROMEDRIVER, CHROMIUM, Portal, chrome, screenshot
from tests.kit import (
    AgentDaemon,
    Institute,
    csv_bytes,
    free_port,
    keygen,
    make_config,
    minute_ago,
    ssh_sign,
    wait_for,
)
from tests.nginxkit import wait_published

pytestmark = pytest.mark.timeout(120)

PAGE_FILES = ("verificador.html", "verificador.js", "verificador.css")


@pytest.fixture(scope="module", autouse=True)
def browser_installed() -> None:
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} missing: apt-get install chromium chromium-driver")


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    profile = Path(tempfile.mkdtemp(prefix="prep-chromium-"))
    driver = chrome(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Setup:
    institute: Institute
    agent: AgentDaemon
    site: Portal
    url: str
    sequence: int = 0

    @property
    def releases(self) -> Path:
        return self.agent.config.releases

    def publish(self) -> tuple[str, dict[str, bytes]]:
        self.sequence += 1
        seq = self.sequence
        when = minute_ago(100 - seq)
        files = {
            "index.html": f"<h1>Corte {seq}</h1>".encode(),
            "datos/COAH_AYUN_2021.csv": csv_bytes(when, seq + 3),
            "datos/Torreón 2021.txt": f"corte {seq}\n".encode() * 50,
            "img/logo.svg": f"<svg xmlns='http://www.w3.org/2000/svg' id='c{seq}'/>".encode(),
        }
        doc = self.institute.manifest(files, seq, when)
        self.institute.deliver(self.agent.config.inbox, files, doc)
        release = str(wait_published(self.agent.config.public, seq)["release"])
        wait_for(lambda: self.serves(doc["cut_time"]), 10, f"cut {seq} served")
        return release, files

    def serves(self, cut_time: str) -> bool:
        """Whether status.json and the frame both show ``cut_time`` (no release file
        is read: the embedded server would keep it in memory)."""
        status = requests.get(f"{self.url}/status.json", timeout=5).json()
        frame = requests.get(f"{self.url}/", timeout=5).text
        return bool(status["cut_time"] == cut_time and f'datetime="{cut_time}"' in frame)

    def writable(self, release: str, path: str) -> Path:
        target = self.releases / release / path
        target.chmod(0o644)
        return target

    def cli(self, *options: str) -> tuple[int, dict[str, Any]]:
        trust = str(self.institute.allowed_signers)
        with contextlib.redirect_stdout(Capture()) as out:
            code = main(["audit", self.url, "--trust", trust, "--json", *options])
        return code, json.loads(out.text)


class Capture:
    """A stdout that keeps what was printed."""

    def __init__(self) -> None:
        self.text = ""

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        """Nothing to flush."""


@contextlib.contextmanager
def setup(tmp: Path, key_type: str) -> Iterator[Setup]:
    inst = Institute(tmp / f"institute-{key_type}", key_type, 3072 if key_type == "rsa" else None)
    listen = f"127.0.0.1:{free_port()}"
    make_config(tmp, inst, listen=listen)
    agent = AgentDaemon(tmp / "prep-agent.conf")
    site = Portal(tmp / "institute-site")
    package = resources.files("prep_agent.institute.audit") / "static"
    for name in PAGE_FILES:
        (site.folder / name).write_bytes((package / name).read_bytes())
    shutil.copyfile(inst.allowed_signers, site.folder / "allowed_signers")
    try:
        agent.start()
        yield Setup(inst, agent, site, f"http://{listen}")
    finally:
        agent.stop()
        site.stop()


def page_result(
    driver: WebDriver, s: Setup, name: str, expect: int | None = None
) -> dict[str, Any]:
    """Open the verifier on the difusor; return its verdict, findings and file rows."""
    query = f"?difusor={quote(s.url + '/')}" + (f"&secuencia={expect}" if expect else "")
    driver.get(f"{s.site.origin}/verificador.html{query}")
    result = driver.find_element(By.ID, "resultado")

    def done() -> str | None:
        verdict = result.get_attribute("data-verdict")
        return verdict if verdict else None

    verdict = wait_for(done, 30, f"the verifier's verdict ({name})", interval=0.1)
    screenshot(driver, f"verificador-{name}")
    findings = [
        li.get_attribute("data-path")
        for li in driver.find_elements(By.CSS_SELECTOR, "#hallazgos li")
    ]
    rows = {
        tr.get_attribute("data-path"): tr.get_attribute("data-result")
        for tr in driver.find_elements(By.CSS_SELECTOR, "#archivos tbody tr")
    }
    return {"verdict": verdict, "findings": findings, "rows": rows, "text": result.text}


def agree(
    driver: WebDriver, s: Setup, name: str, *cli_options: str, expect: int | None = None
) -> dict[str, Any]:
    """The page and the CLI reach the same verdict on the same paths (headers aside:
    the page does not check Cache-Control)."""
    code, report = s.cli(*cli_options)
    page = page_result(driver, s, name, expect)
    cli_paths = sorted(
        f["path"] for f in report["findings"] if not f["expected"].startswith("Cache-Control")
    )
    assert page["verdict"] == report["verdict"], (page, report)
    assert sorted(p for p in page["findings"] if p) == cli_paths, (page, report)
    return {"code": code, "report": report, "page": page}


@pytest.mark.parametrize("key_type", ["ed25519", "ecdsa", "rsa"])
def test_verifier_page_agrees_with_the_cli(
    browser: WebDriver, tmp_path: Path, key_type: str
) -> None:
    with setup(tmp_path, key_type) as s:
        release, files = s.publish()
        seen = agree(browser, s, f"{key_type}-intacta")
        assert seen["page"]["verdict"] == "intact" and "Copia íntegra" in seen["page"]["text"]
        assert set(seen["page"]["rows"].values()) == {"ok"} and len(seen["page"]["rows"]) == 4

        release, files = s.publish()
        csv = "datos/COAH_AYUN_2021.csv"
        with s.writable(release, csv).open("r+b") as fh:
            fh.seek(len(files[csv]) - 3)
            fh.write(b"9")
        s.writable(release, "img/logo.svg").unlink()
        seen = agree(browser, s, f"{key_type}-alterada")
        assert seen["page"]["verdict"] == "altered"
        rows = seen["page"]["rows"]
        assert (rows[csv], rows["img/logo.svg"], rows["index.html"]) == ("alterado", "falta", "ok")

        seen = agree(browser, s, f"{key_type}-desactualizada", "--expect-sequence", "3", expect=3)
        assert seen["page"]["verdict"] == "altered"  # altered outranks stale

        release, files = s.publish()
        seen = agree(browser, s, f"{key_type}-anterior", "--expect-sequence", "4", expect=4)
        assert seen["page"]["verdict"] == "stale" and seen["code"] == 7

        release, files = s.publish()  # a release nobody read yet (the server keeps files read)
        other = tmp_path / "other"
        keygen(other)
        well_known = s.releases / release / ".well-known/prep-cut"
        doc = json.loads((well_known / "manifest.json").read_bytes())
        forged = b"<h1>Otro resultado</h1>"
        s.writable(release, "index.html").write_bytes(forged)
        for entry in doc["files"]:
            if entry["path"] == "index.html":
                entry.update(size=len(forged), sha256=hashlib.sha256(forged).hexdigest())
        data = json.dumps(doc, indent=1).encode()
        s.writable(release, ".well-known/prep-cut/manifest.json").write_bytes(data)
        s.writable(release, ".well-known/prep-cut/manifest.json.sig").write_bytes(
            ssh_sign(other, data)
        )
        seen = agree(browser, s, f"{key_type}-otra-llave")
        assert seen["page"]["verdict"] == "altered" and seen["page"]["rows"] == {}
