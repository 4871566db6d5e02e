"""A real headless Chromium (Debian's chromium + chromium-driver) driven by Selenium.

Helpers for tests/test_browser.py: the browser, a real agent daemon serving the
frame, a tiny portal web server on another origin (``python -m http.server`` in
its own process), deadlines instead of sleeps, screenshots in ``test-artifacts/``.
Nothing is downloaded: Selenium is given the system browser and driver.
"""

from __future__ import annotations

import html
import subprocess
import sys
from pathlib import Path
from typing import Any

import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

from tests.kit import AgentDaemon, Institute, free_port, make_config, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
"""Screenshots (git-ignored)."""
BROWSER_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chrome(user_data_dir: Path, width: int = 1280, height: int = 900) -> WebDriver:
    """Headless Chromium with a fresh profile, console logs captured."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in BROWSER_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    driver.set_script_timeout(10)
    return driver


def emulate_phone(driver: WebDriver, width: int = 390, height: int = 844) -> None:
    """A phone viewport (headless windows cannot be narrower than 500 px)."""
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True},
    )


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the viewport as ``test-artifacts/<name>.png``."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    assert driver.save_screenshot(str(path)), f"screenshot {name} failed"
    return path


def browser_log(driver: WebDriver) -> list[dict[str, Any]]:
    """Console messages since the last call (reading drains the buffer)."""
    return list(driver.get_log("browser"))


class Agent(AgentDaemon):
    """``prep-agent run`` on a free port; the frame is reached as http://localhost:PORT."""

    def __init__(self, tmp_path: Path, inst: Institute, **settings: Any) -> None:
        self.inst = inst
        self.port = free_port()
        make_config(tmp_path, inst, listen=f"127.0.0.1:{self.port}", **settings)
        super().__init__(tmp_path / "prep-agent.conf")
        self.url = f"http://localhost:{self.port}/"
        self.direct = f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        """``/status.json`` as the agent serves it."""
        doc: dict[str, Any] = requests.get(self.direct + "/status.json", timeout=5).json()
        return doc

    def wait_published(self, sequence: int, timeout: float = 15) -> dict[str, Any]:
        """Wait until the agent serves ``sequence`` in status.json; return the status."""

        def probe() -> dict[str, Any] | None:
            try:
                status = self.status()
            except (requests.RequestException, ValueError):
                return None
            return status if status.get("sequence") == sequence else None

        return wait_for(probe, timeout, f"cut {sequence} published ({self.log})", interval=0.1)


PORTAL_PAGE = """<!doctype html>
<html lang="es-MX">
<head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Portal de prueba · Elecciones 2021</title>
<style>
body {{ margin: 0; font: 16px/1.4 Georgia, serif; background: #fafafa; color: #222; }}
header {{ padding: .5rem 1rem; background: #222; color: #fff; }}
section {{ padding: .5rem 1rem; }}
iframe {{ display: block; width: 100%; height: {height}px; border: 1px solid #999; }}
</style></head>
<body>
<header><strong>El Portal de Prueba</strong> · Elecciones locales 2021</header>
<section><p>Resultados preliminares publicados por el difusor oficial:</p>
<iframe id="prep" title="Resultados Electorales Preliminares" src="{src}"></iframe>
</section>
</body>
</html>
"""


class Portal:
    """A news site on its own origin (http://127.0.0.1:PORT) that embeds the frame."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        (folder / "favicon.ico").write_bytes(b"")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "--directory",
                str(folder),
                str(self.port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(self._answers, 10, "portal web server answers", interval=0.1)
        except AssertionError:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            return requests.get(self.origin + "/favicon.ico", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def page(self, name: str, src: str, height: int = 560) -> str:
        """Write a page embedding ``src``; return its URL."""
        text = PORTAL_PAGE.format(src=html.escape(src), height=height)
        (self.folder / f"{name}.html").write_text(text, encoding="utf-8")
        return f"{self.origin}/{name}.html"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


# Runs inside the frame document: records, on every DOM change, every animation
# frame and every 100 ms, the cut time on screen and the content of the visible
# nested iframe(s), so a test can tell whether a new time was ever shown with the
# old publication (or the reverse).
SAMPLER_JS = """
window.__samples = [];
function visibleContents() {
  var out = [];
  document.querySelectorAll("main iframe").forEach(function (f) {
    if (getComputedStyle(f).visibility === "hidden" || f.hidden) { return; }
    var text = "?";
    try {
      var h = f.contentDocument && f.contentDocument.querySelector("h1");
      text = h ? h.textContent : "";
    } catch (e) { text = "inaccessible"; }
    out.push(text);
  });
  return out;
}
function sample(kind) {
  window.__samples.push({
    kind: kind, t: Math.round(performance.now()),
    time: document.getElementById("cut-time").textContent,
    contents: visibleContents()
  });
}
new MutationObserver(function () { sample("mutation"); }).observe(
  document.body, {subtree: true, childList: true, characterData: true, attributes: true});
setInterval(function () { sample("interval"); }, 100);
(function frame() { sample("raf"); requestAnimationFrame(frame); })();
"""
