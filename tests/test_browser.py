"""The embeddable frame in a real browser (headless Chromium through Selenium).

Real processes only: the agent daemon serves the frame on http://localhost:PORT;
a portal page on another origin (http://127.0.0.1:OTHER) embeds it; nginx
serves it from disk when the agent is stopped. Screenshots go to test-artifacts/.
Staleness is driven by the server clock (Date header) and the signed cut time,
so the tests control it by signing cuts whose cut_time is already old.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from prep_agent.web.frame import FINAL_TEXT, STALE_TEXT
from tests.browserkit import (
    CHROMEDRIVER,
    CHROMIUM,
    SAMPLER_JS,
    Agent,
    Portal,
    browser_log,
    chrome,
    emulate_phone,
    screenshot,
)
from tests.kit import OFFSET, Institute, free_port, wait_for

pytestmark = pytest.mark.timeout(90)

POLL = 1
"""poll_seconds of every config here (the floor: agent/config.py refuses less)."""
SWITCH = POLL + 5
"""A new cut must be on screen this many seconds after the agent published it."""
NAME = "Diario de Prueba"


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


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    site = Portal(tmp_path_factory.mktemp("portal"))
    yield site
    site.stop()


@pytest.fixture(scope="module")
def other_portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    site = Portal(tmp_path_factory.mktemp("other-portal"))
    yield site
    site.stop()


@pytest.fixture
def fresh(browser: WebDriver) -> WebDriver:
    """The shared browser, on a blank page, with its console log drained."""
    browser.switch_to.default_content()
    browser.get("about:blank")
    browser_log(browser)
    return browser


class Agents:
    """Starts agent daemons for a test; stopping them is left to ``reaper``."""

    def __init__(self, tmp_path: Path, institute: Institute, portal: Portal) -> None:
        self.tmp_path = tmp_path
        self.institute = institute
        self.portal = portal
        self.started: list[Agent] = []

    def start(self, name: str = "agent") -> Agent:
        agent = Agent(
            self.tmp_path / name,
            self.institute,
            frame_ancestors=self.portal.origin,
            difusor_name=NAME,
            poll_seconds=POLL,
        )
        self.started.append(agent)
        return agent.start()


@pytest.fixture(scope="module")
def reaper() -> Iterator[list[Agent]]:
    """Waits for the agents of the module at its end.

    An agent stopping while the browser holds keep-alive connections to it takes
    5 s (waitress keeps serving open channels until the join timeout of
    ``Server.stop``); SIGTERM is sent at each test's end and the exits collected
    here, so the module does not wait 5 s per test.
    """
    agents: list[Agent] = []
    yield agents
    codes = {str(a.log): a.stop() for a in agents}
    assert all(code == 0 for code in codes.values()), codes


@pytest.fixture
def agents(
    tmp_path: Path, institute: Institute, portal: Portal, reaper: list[Agent]
) -> Iterator[Agents]:
    started = Agents(tmp_path, institute, portal)
    yield started
    for agent in started.started:
        agent.terminate()
        reaper.append(agent)


def label(when: datetime) -> str:
    return f"Corte de información: {when:%d/%m/%Y %H:%M} h (UTC-6)"


def now_utc6(seconds_ago: float = 0) -> datetime:
    return (datetime.now(OFFSET) - timedelta(seconds=seconds_ago)).replace(microsecond=0)


def deliver(agent: Agent, sequence: int, when: datetime, **extra: Any) -> dict[str, Any]:
    """Deliver a signed cut; return the status once the agent published it."""
    files = agent.inst.files(when, sequence)
    agent.inst.deliver(
        agent.config.inbox, files, agent.inst.manifest(files, sequence, when, **extra)
    )
    return agent.wait_published(sequence)


def open_in_portal(driver: WebDriver, portal: Portal, agent: Agent, name: str) -> None:
    """Load a portal page embedding the frame and switch into the frame."""
    driver.get(portal.page(name, agent.url))
    enter_frame(driver)
    wait_for(lambda: text_of(driver, "cut-time"), 10, "the frame shows a cut time")


def enter_frame(driver: WebDriver) -> None:
    driver.switch_to.default_content()
    driver.switch_to.frame(driver.find_element(By.ID, "prep"))


def text_of(driver: WebDriver, element_id: str) -> str:
    found = driver.find_elements(By.ID, element_id)
    return found[0].text if found else ""


def shown(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.execute_script(f"return !document.getElementById('{element_id}').hidden;"))


def publication_heading(driver: WebDriver) -> str:
    """The <h1> of the institute's page in the nested iframe (from inside the frame)."""
    driver.switch_to.frame(driver.find_element(By.ID, "publication"))
    try:
        return wait_for(lambda: text_of_tag(driver, "h1"), 10, "the publication loaded")
    finally:
        driver.switch_to.parent_frame()


def text_of_tag(driver: WebDriver, tag: str) -> str:
    found = driver.find_elements(By.TAG_NAME, tag)
    return found[0].text if found else ""


def severe(log: list[dict[str, Any]]) -> list[str]:
    return [e["message"] for e in log if e["level"] == "SEVERE"]


# 1 ------------------------------------------------------------------------------


def test_portal_embeds_frame_with_cut_time(
    fresh: WebDriver, portal: Portal, agents: Agents
) -> None:
    when = now_utc6(120)
    agent = agents.start()
    deliver(agent, 1, when)
    server_html = requests.get(agent.direct + "/", timeout=5).text
    assert f"{when:%d/%m/%Y %H:%M} h (UTC-6)</time>" in server_html

    open_in_portal(fresh, portal, agent, "embed")
    assert text_of(fresh, "cut") == label(when)
    # The script re-renders every second: its formatting must match the server's.
    time.sleep(1.5)
    assert text_of(fresh, "cut") == label(when)
    assert fresh.find_element(By.ID, "cut-time").get_attribute("datetime") == when.isoformat()
    assert NAME in text_of_tag(fresh, "header")
    assert fresh.execute_script("return document.body.dataset.state") == "current"
    assert not shown(fresh, "stale-notice") and not shown(fresh, "final-notice")
    assert publication_heading(fresh) == "Corte 1"
    src = fresh.find_element(By.ID, "publication").get_attribute("src")
    assert src.startswith(agent.url + "cortes/") and src.endswith("/index.html")

    fresh.switch_to.default_content()
    assert fresh.title.startswith("Portal de prueba")
    path = screenshot(fresh, "1-portal-embeds-frame")
    assert path.stat().st_size > 5000
    problems = [m for m in severe(browser_log(fresh)) if "favicon" not in m]
    assert not problems, problems


# 2 ------------------------------------------------------------------------------


def test_new_cut_swaps_without_reload_and_never_mixes(
    fresh: WebDriver, portal: Portal, agents: Agents
) -> None:
    first, second = now_utc6(240), now_utc6(60)
    agent = agents.start()
    deliver(agent, 1, first)
    open_in_portal(fresh, portal, agent, "swap")
    assert publication_heading(fresh) == "Corte 1"
    fresh.execute_script("window.__marker = 1;" + SAMPLER_JS)

    deliver(agent, 2, second)
    published = time.monotonic()
    wait_for(lambda: text_of(fresh, "cut") == label(second), SWITCH, "cut 2's time shown")
    took = time.monotonic() - published
    time.sleep(0.5)  # a few more samples after the switch

    assert fresh.execute_script("return window.__marker") == 1, "the frame reloaded"
    assert publication_heading(fresh) == "Corte 2"
    assert len(fresh.find_elements(By.CSS_SELECTOR, "main iframe")) == 1
    assert fresh.find_element(By.ID, "publication").get_attribute("title")

    samples = fresh.execute_script("return window.__samples")
    expected = {
        f"{first:%d/%m/%Y %H:%M} h (UTC-6)": "Corte 1",
        f"{second:%d/%m/%Y %H:%M} h (UTC-6)": "Corte 2",
    }
    mixed = [s for s in samples if s["contents"] != [expected.get(s["time"])]]
    assert not mixed, f"time and publication disagree on screen: {mixed[:5]}"
    times = [s["time"] for s in samples]
    assert times[0] in expected and expected[times[0]] == "Corte 1"
    assert expected[times[-1]] == "Corte 2"
    intervals = [s["t"] for s in samples if s["kind"] == "interval"]
    assert len(intervals) >= 10 and max(b - a for a, b in zip(intervals, intervals[1:])) < 400
    print(f"switched {took:.1f} s after publication; {len(samples)} samples consistent")


# 3 ------------------------------------------------------------------------------


def test_interruption_notice_by_server_clock(
    fresh: WebDriver, portal: Portal, agents: Agents
) -> None:
    when = now_utc6(170)  # period 60 s × 3 periods: stale 10 s from now
    stale_at = when + timedelta(seconds=180)
    agent = agents.start()
    deliver(agent, 1, when, period_seconds=60)
    open_in_portal(fresh, portal, agent, "stale")
    assert datetime.now(OFFSET) < stale_at - timedelta(seconds=2), "setup too slow"
    assert not shown(fresh, "stale-notice")
    notice = fresh.find_element(By.ID, "stale-notice")
    assert not notice.is_displayed()

    wait_for(notice.is_displayed, 15, "the interruption notice appears")
    appeared = datetime.now(OFFSET)
    assert appeared >= stale_at - timedelta(seconds=1.5), f"stale too early: {appeared}"
    assert appeared <= stale_at + timedelta(seconds=3), f"stale too late: {appeared}"
    assert notice.get_attribute("role") == "alert"
    assert notice.text == STALE_TEXT
    assert fresh.execute_script("return document.body.dataset.state") == "stale"
    assert text_of(fresh, "cut") == label(when), "the last cut stays on screen"
    assert publication_heading(fresh) == "Corte 1"
    fresh.switch_to.default_content()
    screenshot(fresh, "3-stale-notice")
    enter_frame(fresh)

    later = now_utc6(5)
    deliver(agent, 2, later, period_seconds=60)
    wait_for(lambda: not notice.is_displayed(), SWITCH, "the notice goes with a new cut")
    assert text_of(fresh, "cut") == label(later)
    assert publication_heading(fresh) == "Corte 2"
    assert fresh.execute_script("return document.body.dataset.state") == "current"


# 4 ------------------------------------------------------------------------------


def test_institute_notices_render_as_sent(fresh: WebDriver, portal: Portal, agents: Agents) -> None:
    info = "Aviso del Instituto: el corte incluye el 95.3 % de las actas <capturadas> & contadas."
    stop = "El Instituto suspendió temporalmente la captura en el distrito 04 (Torreón)."
    agent = agents.start()
    deliver(agent, 1, now_utc6(300), notice={"level": "info", "text": info})
    open_in_portal(fresh, portal, agent, "notices")
    notice = fresh.find_element(By.ID, "institute-notice")
    assert notice.is_displayed() and notice.text == info
    assert notice.get_attribute("class") == "notice info"
    fresh.switch_to.default_content()
    screenshot(fresh, "4-notice-info")
    enter_frame(fresh)

    deliver(agent, 2, now_utc6(200), notice={"level": "interrupted", "text": stop})
    wait_for(lambda: notice.text == stop, SWITCH, "the interrupted notice replaces info")
    assert notice.is_displayed()
    assert notice.get_attribute("class") == "notice interrupted"
    assert publication_heading(fresh) == "Corte 2"
    fresh.switch_to.default_content()
    screenshot(fresh, "4-notice-interrupted")
    enter_frame(fresh)

    deliver(agent, 3, now_utc6(100))
    wait_for(lambda: not notice.is_displayed(), SWITCH, "a cut without notice clears it")
    assert notice.text == ""


def test_final_cut_is_never_stale(fresh: WebDriver, portal: Portal, agents: Agents) -> None:
    when = now_utc6(3 * 3600)  # 180 periods old
    closing = "Cierre del PREP: 100 % de las actas computadas."
    agent = agents.start()
    deliver(
        agent,
        1,
        when,
        period_seconds=60,
        final=True,
        notice={"level": "info", "text": closing},
    )
    open_in_portal(fresh, portal, agent, "final")
    final = fresh.find_element(By.ID, "final-notice")
    assert final.is_displayed() and final.text == FINAL_TEXT
    assert text_of(fresh, "institute-notice") == closing
    assert text_of(fresh, "cut") == label(when)
    deadline = time.monotonic() + 2.5  # a few re-renders and a poll
    while time.monotonic() < deadline:
        assert not fresh.find_element(By.ID, "stale-notice").is_displayed()
        assert fresh.execute_script("return document.body.dataset.state") == "final"
        time.sleep(0.25)
    assert agent.status()["state"] == "final"
    fresh.switch_to.default_content()
    screenshot(fresh, "4-final")


# 5 ------------------------------------------------------------------------------


def test_embedding_refused_from_other_origin(
    fresh: WebDriver, portal: Portal, other_portal: Portal, agents: Agents
) -> None:
    agent = agents.start()
    deliver(agent, 1, now_utc6(120))

    fresh.get(other_portal.page("refused", agent.url))
    wait_for(lambda: refused_message(browser_log(fresh)), 10, "a frame-ancestors violation")
    enter_frame(fresh)
    where = fresh.execute_script("return location.href")
    assert where != agent.url, "the frame loaded on a non-allowed origin"
    assert not fresh.find_elements(By.ID, "cut-time")
    fresh.switch_to.default_content()
    screenshot(fresh, "5-refused-origin")

    # The same page on the allowed origin renders, without a violation.
    open_in_portal(fresh, portal, agent, "allowed")
    assert fresh.execute_script("return location.href") == agent.url
    assert not refused_message(browser_log(fresh))


def refused_message(log: list[dict[str, Any]]) -> str:
    return next((e["message"] for e in log if "frame-ancestors" in e["message"]), "")


# 7 ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def phone() -> Iterator[WebDriver]:
    profile = Path(tempfile.mkdtemp(prefix="prep-chromium-phone-"))
    driver = chrome(profile, 390, 844)
    emulate_phone(driver, 390, 844)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def fits(driver: WebDriver) -> dict[str, Any]:
    """Viewport, document width and the cut time's box."""
    box: dict[str, Any] = driver.execute_script(
        "var r = document.getElementById('cut-time').getBoundingClientRect();"
        "return {inner: innerWidth, innerH: innerHeight,"
        " scroll: document.documentElement.scrollWidth,"
        " left: r.left, right: r.right, top: r.top, bottom: r.bottom};"
    )
    return box


def test_phone_width(phone: WebDriver, portal: Portal, agents: Agents) -> None:
    when = now_utc6(120)
    agent = agents.start()
    deliver(
        agent,
        1,
        when,
        notice={"level": "info", "text": "Aviso del Instituto: corte con 95 % de actas."},
    )
    phone.get(agent.url)
    wait_for(lambda: text_of(phone, "cut") == label(when), 10, "cut time on the phone")
    box = fits(phone)
    assert box["inner"] == 390, box
    assert box["scroll"] <= box["inner"], f"horizontal scrolling: {box}"
    assert box["left"] >= 0 and box["right"] <= box["inner"], box
    assert box["top"] >= 0 and box["bottom"] <= box["innerH"], box
    assert phone.find_element(By.ID, "cut-time").is_displayed()
    screenshot(phone, "7-phone-frame")

    phone.get(portal.page("phone", agent.url, height=640))
    enter_frame(phone)
    wait_for(lambda: text_of(phone, "cut") == label(when), 10, "cut time in the portal")
    box = fits(phone)
    assert box["scroll"] <= box["inner"], f"horizontal scrolling: {box}"
    assert box["left"] >= 0 and box["right"] <= box["inner"], box
    phone.switch_to.default_content()
    assert phone.execute_script("return document.documentElement.scrollWidth <= innerWidth")
    screenshot(phone, "7-phone-portal")


def test_accessibility_basics(fresh: WebDriver, portal: Portal, agents: Agents) -> None:
    agent = agents.start()
    deliver(agent, 1, now_utc6(120), notice={"level": "info", "text": "Aviso de prueba."})
    open_in_portal(fresh, portal, agent, "a11y")
    assert fresh.execute_script("return document.documentElement.lang") == "es-MX"
    region = fresh.find_element(By.CSS_SELECTOR, ".notices")
    assert region.get_attribute("aria-live") == "polite"
    assert fresh.find_element(By.ID, "stale-notice").get_attribute("role") == "alert"
    title = fresh.find_element(By.ID, "publication").get_attribute("title")
    assert title == "Resultados Electorales Preliminares"
    assert (
        fresh.execute_script("return document.title")
        == f"Resultados Electorales Preliminares · {NAME}"
    )


def test_live_region_quiet_while_nothing_changes(
    fresh: WebDriver, portal: Portal, agents: Agents
) -> None:
    """Screen readers announce changes in an aria-live region: the page must not
    rewrite the region's text every second when nothing changed."""
    agent = agents.start()
    deliver(agent, 1, now_utc6(120), notice={"level": "info", "text": "Aviso de prueba."})
    open_in_portal(fresh, portal, agent, "live")
    fresh.execute_script(
        "window.__live = [];"
        "new MutationObserver(function (records) {"
        "  records.forEach(function (r) { window.__live.push(r.type + ' ' +"
        "    (r.target.id || r.target.parentNode && r.target.parentNode.id)); });"
        "}).observe(document.querySelector('.notices'),"
        " {subtree: true, childList: true, characterData: true});"
    )
    time.sleep(3.2)  # three re-renders, nothing new
    changes = fresh.execute_script("return window.__live")
    assert not changes, f"live region rewritten with no news: {changes[:6]}"


def test_first_cut_replaces_opening_text(fresh: WebDriver, portal: Portal, agents: Agents) -> None:
    """A portal embeds the frame before the PREP opens; the first cut appears by itself."""
    agent = agents.start()
    fresh.get(portal.page("opening", agent.url))
    enter_frame(fresh)
    opening = wait_for(lambda: fresh.find_elements(By.ID, "opening"), 10, "the frame loads")[0]
    assert opening.is_displayed() and "iniciará" in opening.text
    assert not fresh.find_element(By.ID, "cut").is_displayed()
    assert fresh.execute_script("return document.body.dataset.state") == "no-cut"
    fresh.switch_to.default_content()
    screenshot(fresh, "2-opening")
    enter_frame(fresh)
    fresh.execute_script("window.__marker = 1;")

    when = now_utc6(60)
    deliver(agent, 1, when)
    wait_for(lambda: text_of(fresh, "cut") == label(when), SWITCH, "the first cut shown")
    assert not opening.is_displayed()
    assert publication_heading(fresh) == "Corte 1"
    assert fresh.execute_script("return window.__marker") == 1, "the frame reloaded"


# Installed before any script of the page: shifts this browser's clock and records
# every instant the interruption notice is visible / hidden.
CLOCK_JS = """
(function () {
  var offset = %d * 1000, real = Date.now;
  Date.now = function () { return real() + offset; };
  window.__notice = [];
  new MutationObserver(function () {
    var n = document.getElementById("stale-notice");
    var state = n ? (n.hidden ? "hidden" : "shown") : "absent";
    if (window.__notice[window.__notice.length - 1] !== state) { window.__notice.push(state); }
  }).observe(document, {subtree: true, childList: true, attributes: true});
})();
"""


def notice_history(driver: WebDriver, url: str, offset: int) -> list[str]:
    """Load ``url`` top-level with the browser clock ``offset`` s off; the notice's states."""
    script = CLOCK_JS % offset
    added = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})
    try:
        # A distinct query: the frame is cacheable for 5 s (max-age), and a cached copy of
        # the previous cut's page would show that cut's (correct) notice first.
        driver.get(f"{url}?clock={offset}")
        time.sleep(1.6)  # the first poll and a re-render
        history: list[str] = driver.execute_script("return window.__notice")
        return [h for h in history if h != "absent"]
    finally:
        driver.execute_cdp_cmd(
            "Page.removeScriptToEvaluateOnNewDocument", {"identifier": added["identifier"]}
        )


def test_browser_clock_is_not_trusted(fresh: WebDriver, agents: Agents) -> None:
    """§6: staleness by the server clock only. A reader's clock an hour off must not
    flash the interruption alert on a fresh cut, nor hide it on a stale one."""
    agent = agents.start()
    deliver(agent, 1, now_utc6(200), period_seconds=60)  # stale 20 s ago
    behind = notice_history(fresh, agent.url, -3600)
    deliver(agent, 2, now_utc6(10), period_seconds=600)  # stale in 30 min
    ahead = notice_history(fresh, agent.url, +3600)
    assert fresh.execute_script("return document.body.dataset.state") == "current"
    assert (behind, ahead) == (["shown"], ["hidden"]), (
        f"stale cut, clock 1 h behind: notice went {behind}; "
        f"fresh cut, clock 1 h ahead: notice went {ahead}"
    )


# 6 (needs nginx; last) --------------------------------------------------------------


def test_notice_appears_with_agent_stopped(
    fresh: WebDriver, portal: Portal, agents: Agents, tmp_path: Path
) -> None:
    """The packaged nginx site (tests/nginxkit.py) serves the agent's files from disk;
    with the agent stopped the page still turns stale by nginx's Date header."""
    from tests.nginxkit import Nginx, instantiate

    when = now_utc6(170)
    stale_at = when + timedelta(seconds=180)
    agent = agents.start()
    port = free_port()
    conf = instantiate(tmp_path / "nginx", agent.config.root, agent.config.listen, port)
    nginx = Nginx(conf, port)
    nginx.start()
    try:
        deliver(agent, 1, when, period_seconds=60)
        frame = f"http://localhost:{port}/"
        status = requests.get(f"http://127.0.0.1:{port}/status.json", timeout=5)
        assert status.json()["sequence"] == 1 and "Date" in status.headers

        fresh.get(portal.page("nginx", frame))
        enter_frame(fresh)
        wait_for(lambda: text_of(fresh, "cut") == label(when), 10, "the frame through nginx")
        assert fresh.execute_script("return location.href") == frame
        assert publication_heading(fresh) == "Corte 1"
        assert not fresh.find_element(By.ID, "stale-notice").is_displayed()

        assert agent.stop() == 0, agent.log.read_text()
        with pytest.raises(requests.ConnectionError):
            requests.get(agent.direct + "/status.json", timeout=2)
        assert requests.get(f"http://127.0.0.1:{port}/status.json", timeout=5).ok
        stopped = datetime.now(OFFSET).replace(microsecond=0)

        notice = fresh.find_element(By.ID, "stale-notice")
        wait_for(notice.is_displayed, 15, "the notice with the agent stopped")
        appeared = datetime.now(OFFSET)
        assert stale_at - timedelta(seconds=1.5) <= appeared <= stale_at + timedelta(seconds=3)
        assert notice.text == STALE_TEXT
        assert publication_heading(fresh) == "Corte 1"
        fresh.switch_to.default_content()
        screenshot(fresh, "6-stale-agent-stopped")
        wait_for(lambda: browser_polls(nginx.access_log(), stopped), 2, "polls after the stop")
    finally:
        fresh.get("about:blank")
        nginx.stop()


def browser_polls(access_log: str, since: datetime) -> list[datetime]:
    """When the browser fetched status.json through nginx, at or after ``since``."""
    found = []
    for line in access_log.splitlines():
        if "GET /status.json" in line and "Chrome" in line:
            stamp = line.split("[", 1)[1].split("]", 1)[0]
            when = datetime.strptime(stamp, "%d/%b/%Y:%H:%M:%S %z")
            if when >= since:
                found.append(when)
    return found
