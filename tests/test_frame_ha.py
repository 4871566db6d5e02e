"""The frame behind a balancer (packaging/ha): origins switch cuts at different
moments, so the next status.json may name a release the answering server lacks,
or an older cut. In a real headless Chromium, against a real web server whose
files the test swaps as a lagging origin would serve them: the frame never
shows a 404 page, never steps back to a lower sequence, and swaps once the
release answers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browserkit import Agent, Portal, chrome
from tests.kit import Institute, wait_for

pytestmark = pytest.mark.timeout(120)

POLL = 1
"""poll_seconds (the page's minimum: each wait below spans two polls and a retry)."""


def shown(driver: WebDriver) -> tuple[str, str]:
    """The sequence on screen and the src of the visible publication iframe (read at once)."""
    got = driver.execute_script(
        "var f = document.getElementById('publication');"
        "return [document.body.getAttribute('data-sequence') || '',"
        " f ? f.getAttribute('src') || '' : ''];"
    )
    return str(got[0]), str(got[1])


def put(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def test_frame_waits_for_a_missing_release_and_never_steps_back(tmp_path: Path) -> None:
    inst = Institute(tmp_path / "institute")
    agent = Agent(tmp_path / "agent", inst, poll_seconds=POLL).start()
    site = tmp_path / "site"
    try:
        inst.cut(agent.config.inbox, 1)
        first = agent.wait_published(1)
        shutil.copytree(agent.config.public, site)
        shutil.copytree(
            agent.config.releases / first["release"], site / "cortes" / first["release"]
        )
        status_1 = (agent.config.public / "status.json").read_bytes()
        inst.cut(agent.config.inbox, 2)
        second = agent.wait_published(2)
        status_2 = (agent.config.public / "status.json").read_bytes()
        release_2 = agent.config.releases / second["release"]
        shutil.copytree(release_2, tmp_path / "release-2")
    finally:
        agent.stop()
    server = Portal(site)
    profile = Path(tempfile.mkdtemp(prefix="prep-chromium-"))
    driver = chrome(profile)
    try:
        driver.get(f"{server.origin}/index.html")
        wait_for(lambda: shown(driver)[0] == "1", 15, "cut 1 on screen")
        # An origin that published cut 2 answered status.json; this one lacks its release.
        put(site / "status.json", status_2)
        time.sleep(2 * POLL + 1)
        sequence, src = shown(driver)
        assert sequence == "1" and first["release"] in src, (sequence, src)
        sources = driver.execute_script(
            "return Array.from(document.querySelectorAll('iframe'), f => f.getAttribute('src'));"
        )
        assert not [s for s in sources if second["release"] in s], "no iframe loads it"
        # The release arrives: the frame swaps to it.
        shutil.copytree(tmp_path / "release-2", site / "cortes" / second["release"])
        wait_for(lambda: shown(driver)[0] == "2", 2 * POLL + 5, "cut 2 on screen")
        assert second["release"] in shown(driver)[1]
        # A lagging origin answers next with cut 1: the frame stays on cut 2.
        put(site / "status.json", status_1)
        time.sleep(2 * POLL + 1)
        sequence, src = shown(driver)
        assert sequence == "2" and second["release"] in src, (sequence, src)
    finally:
        driver.quit()
        server.stop()
        shutil.rmtree(profile, ignore_errors=True)
