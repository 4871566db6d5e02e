"""The verifier page against a hostile difusor, agreeing with ``prep-agent audit`` (issue 17).

A real agent serves a real signed cut through its embedded server and through
the packaged nginx site; a hostile front (``tests.auditkit``) before it answers
200 with an HTML error page (for a file, for status.json), answers slowly (or
a byte at a time), or sends a huge or endless body. In headless Chromium the page must reach the
CLI's verdict on the CLI's paths, show the per-file result, give up on a slow
read after its wait, and stop reading a body past the file's signed size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
import requests
from selenium.webdriver.remote.webdriver import WebDriver

from prep_agent.core.errors import EXIT_AUDIT_ALTERED, EXIT_AUDIT_UNREACHABLE, EXIT_OK
from tests.auditkit import ENDLESS, HTML_ERROR, HUGE, SLOW, TRICKLE, Front
from tests.verifierkit import Setup, agree, browser, page_result, require_browser, setup

pytestmark = pytest.mark.timeout(150)

CSV = "datos/COAH_AYUN_2021.csv"
ODD = "datos/Torreón 2021.txt"
LOGO = "img/logo.svg"


@pytest.fixture(scope="module", autouse=True)
def browser_installed() -> None:
    require_browser()


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[WebDriver]:
    with browser() as driver:
        yield driver


@dataclass
class Cut:
    """A published cut and where it is served."""

    s: Setup
    kind: str
    release: str
    files: dict[str, bytes]

    @property
    def base(self) -> str:
        """The request path of the release folder."""
        return f"/cortes/{self.release}/"


@pytest.fixture(scope="module", params=["embedded", "nginx"])
def cut(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cut]:
    kind = str(request.param)
    with setup(tmp_path_factory.mktemp(f"verifier-{kind}"), "ed25519", kind) as s:
        release, files = s.publish()
        yield Cut(s, kind, release, files)


def test_html_error_page_for_a_file(browser: WebDriver, cut: Cut) -> None:
    """200 with a proxy's HTML error page in place of a CSV: altered, and the row says so."""
    with Front(cut.s.url) as front:
        front.spoiled[cut.base + CSV] = HTML_ERROR
        seen = agree(browser, cut.s, f"{cut.kind}-html-archivo", url=front.url)
    assert seen["code"] == EXIT_AUDIT_ALTERED and seen["page"]["verdict"] == "altered"
    rows, texts = seen["page"]["rows"], seen["page"]["row_texts"]
    assert rows[CSV] == "alterado" and "página HTML" in texts[CSV], texts
    assert "text/html" in texts[CSV], texts
    others = {p: r for p, r in rows.items() if p != CSV}
    assert others == dict.fromkeys(("index.html", ODD, LOGO), "ok")


def test_html_error_page_for_status_json(browser: WebDriver, cut: Cut) -> None:
    """... and in place of status.json: nothing else can be checked."""
    with Front(cut.s.url) as front:
        front.spoiled["/status.json"] = HTML_ERROR
        seen = agree(browser, cut.s, f"{cut.kind}-html-status", url=front.url)
    page = seen["page"]
    assert page["verdict"] == "altered" and page["findings"] == ["status.json"]
    assert "página HTML" in page["finding_texts"][0], page
    assert page["rows"] == {}


@pytest.mark.parametrize("how", [SLOW, TRICKLE])
def test_slow_difusor(browser: WebDriver, cut: Cut, how: str) -> None:
    """A file whose answer never ends (stalled, or a byte at a time): no answer
    after the wait, on that file only."""
    with Front(cut.s.url) as front:
        front.spoiled[cut.base + LOGO] = how
        started = time.monotonic()
        name = f"{cut.kind}-lento-{how}"
        seen = agree(browser, cut.s, name, "--timeout", "1", url=front.url, wait=1)
        took = time.monotonic() - started
    assert seen["code"] == EXIT_AUDIT_UNREACHABLE
    assert seen["page"]["verdict"] == "unreachable"
    rows, texts = seen["page"]["rows"], seen["page"]["row_texts"]
    assert rows[LOGO] == "error" and "sin respuesta en 1 s" in texts[LOGO], texts
    assert [rows[p] for p in ("index.html", CSV, ODD)] == ["ok"] * 3
    assert took < 15, f"CLI and page took {took:.1f} s with a 1 s wait"


def test_slow_status_json(browser: WebDriver, cut: Cut) -> None:
    """A difusor whose status.json never ends: no answer, and nothing else is read."""
    with Front(cut.s.url) as front:
        front.spoiled["/status.json"] = SLOW
        seen = agree(
            browser, cut.s, f"{cut.kind}-lento-status", "--timeout", "1", url=front.url, wait=1
        )
    page = seen["page"]
    assert seen["code"] == EXIT_AUDIT_UNREACHABLE and page["verdict"] == "unreachable"
    assert page["findings"] == ["status.json"] and page["rows"] == {}
    assert "sin respuesta en 1 s" in page["finding_texts"][0], page


def test_huge_answers_are_cut_short(browser: WebDriver, cut: Cut) -> None:
    """A 10 GB Content-Length and an endless body: cut short, not read whole."""
    with Front(cut.s.url) as front:
        front.spoiled[cut.base + CSV] = HUGE
        front.spoiled[cut.base + quote(ODD)] = ENDLESS
        seen = agree(browser, cut.s, f"{cut.kind}-enorme", url=front.url)
        sent = front.sent
    assert seen["code"] == EXIT_AUDIT_ALTERED and seen["page"]["verdict"] == "altered"
    rows, texts = seen["page"]["rows"], seen["page"]["row_texts"]
    assert (rows[CSV], rows[ODD], rows[LOGO]) == ("alterado", "alterado", "ok")
    assert "10000000000 bytes (Content-Length)" in texts[CSV], texts
    assert f"más de {len(cut.files[ODD])} bytes" in texts[ODD], texts
    # Both readers wrote into socket buffers, no more: CLI and browser stopped reading.
    assert sent < 64 * 1024**2, sent


def test_a_cut_published_during_the_audit_is_no_alteration(browser: WebDriver, cut: Cut) -> None:
    """status.json read just before a publication, the frame just after: like the CLI,
    the page finds the newer signed cut that status.json names when read again."""
    before = requests.get(f"{cut.s.url}/status.json", timeout=5).content
    cut.release, cut.files = cut.s.publish()
    with Front(cut.s.url) as front:
        front.once["/status.json"] = before
        code, report = cut.s.cli(url=front.url)
        front.once["/status.json"] = before
        page = page_result(browser, cut.s, f"{cut.kind}-publicado-durante", url=front.url)
    assert code == EXIT_OK and report["findings"] == [], report
    assert report["sequence"] == cut.s.sequence - 1
    assert page["verdict"] == "intact" and page["findings"] == [], page
