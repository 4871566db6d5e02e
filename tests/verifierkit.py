"""The institute's verifier page (prep_agent/institute/audit/static) against a real agent.

The page is served from its own origin (the institute's site: a ``python -m
http.server`` with the page and the institute's ``allowed_signers``); it reads
a real agent's public files across origins (the agent's CORS header), served by
the agent's embedded server or by the packaged nginx site. ``agree`` runs
``prep-agent audit`` and the page on the same URL (the difusor's, or a hostile
front's from ``tests.auditkit``) and checks they reach the same verdict on the
same paths. Helpers for tests/test_audit_browser*.py.
"""

from __future__ import annotations

import contextlib
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
    minute_ago,
    wait_for,
)
from tests.nginxkit import serving_agent, wait_published

PAGE_FILES = ("verificador.html", "verificador.js", "verificador.css")


def require_browser() -> None:
    """Fail (never skip) when Debian's chromium or chromium-driver is missing."""
    for tool in (CHROMIUM, CHROMEDRIVER):
        if not os.access(tool, os.X_OK):
            pytest.fail(f"{tool} missing: apt-get install chromium chromium-driver")


@contextlib.contextmanager
def browser() -> Iterator[WebDriver]:
    """Headless Chromium with a throw-away profile."""
    profile = Path(tempfile.mkdtemp(prefix="prep-chromium-"))
    driver = chrome(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@dataclass
class Setup:
    """A running agent (``url``: where the public reads it) and the institute's site."""

    institute: Institute
    agent: AgentDaemon
    site: Portal
    url: str
    sequence: int = 0

    @property
    def releases(self) -> Path:
        return self.agent.config.releases

    def publish(self) -> tuple[str, dict[str, bytes]]:
        """Deliver a new cut whose files no other cut shares; return its release and files."""
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
        """A file of a published release, made writable (as root would)."""
        target = self.releases / release / path
        target.chmod(0o644)
        return target

    def cli(self, *options: str, url: str | None = None) -> tuple[int, dict[str, Any]]:
        """``prep-agent audit --json`` in-process on ``url`` (default: the difusor's)."""
        trust = str(self.institute.allowed_signers)
        with contextlib.redirect_stdout(Capture()) as out:
            code = main(["audit", url or self.url, "--trust", trust, "--json", *options])
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
def setup(tmp: Path, key_type: str, kind: str = "embedded") -> Iterator[Setup]:
    """An agent for an institute with a ``key_type`` key, served by its embedded
    server or (``kind="nginx"``) by the packaged nginx site, and the institute's site."""
    inst = Institute(tmp / f"institute-{key_type}", key_type, 3072 if key_type == "rsa" else None)
    site = Portal(tmp / "institute-site")
    package = resources.files("prep_agent.institute.audit") / "static"
    for name in PAGE_FILES:
        (site.folder / name).write_bytes((package / name).read_bytes())
    shutil.copyfile(inst.allowed_signers, site.folder / "allowed_signers")
    try:
        with serving_agent(tmp, inst, kind) as served:
            yield Setup(inst, served.agent, site, served.url)
    finally:
        site.stop()


def page_result(
    driver: WebDriver,
    s: Setup,
    name: str,
    expect: int | None = None,
    url: str | None = None,
    wait: int | None = None,
) -> dict[str, Any]:
    """Open the verifier on ``url`` (default: the difusor's), ``wait`` seconds per
    read if given; return its verdict, findings (paths and texts) and file rows."""
    query = f"?difusor={quote((url or s.url) + '/')}"
    query += (f"&secuencia={expect}" if expect else "") + (f"&espera={wait}" if wait else "")
    driver.get(f"{s.site.origin}/verificador.html{query}")
    result = driver.find_element(By.ID, "resultado")

    def done() -> str | None:
        verdict = result.get_attribute("data-verdict")
        return verdict if verdict else None

    verdict = wait_for(done, 30, f"the verifier's verdict ({name})", interval=0.1)
    screenshot(driver, f"verificador-{name}")
    items = driver.find_elements(By.CSS_SELECTOR, "#hallazgos li")
    rows = {
        tr.get_attribute("data-path"): tr.get_attribute("data-result")
        for tr in driver.find_elements(By.CSS_SELECTOR, "#archivos tbody tr")
    }
    texts = {
        tr.get_attribute("data-path"): tr.text
        for tr in driver.find_elements(By.CSS_SELECTOR, "#archivos tbody tr")
    }
    return {
        "verdict": verdict,
        "findings": [li.get_attribute("data-path") for li in items],
        "finding_texts": [li.text for li in items],
        "rows": rows,
        "row_texts": texts,
        "text": result.text,
    }


def agree(
    driver: WebDriver,
    s: Setup,
    name: str,
    *cli_options: str,
    expect: int | None = None,
    url: str | None = None,
    wait: int | None = None,
) -> dict[str, Any]:
    """The page and the CLI reach the same verdict on the same paths (headers aside:
    the page does not check Cache-Control)."""
    code, report = s.cli(*cli_options, url=url)
    page = page_result(driver, s, name, expect, url, wait)
    cli_paths = sorted(
        f["path"] for f in report["findings"] if not f["expected"].startswith("Cache-Control")
    )
    assert page["verdict"] == report["verdict"], (page, report)
    assert sorted(p for p in page["findings"] if p) == cli_paths, (page, report)
    return {"code": code, "report": report, "page": page}
