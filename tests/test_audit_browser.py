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

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.kit import keygen, ssh_sign
from tests.verifierkit import agree, browser, require_browser, setup

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def browser_installed() -> None:
    require_browser()


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[WebDriver]:
    with browser() as driver:
        yield driver


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
