"""The browser viewer of a rehearsal: one headless Chromium showing a portal page
that embeds every difusor's frame, sampled once a second.

It is used when Selenium (a development dependency, ``requirements-dev.txt``)
and Debian's ``chromium`` + ``chromedriver`` are installed, else the report
says it did not run. For each frame it records the first time each sequence is
on screen, a sequence or cut time that goes backwards, a frame whose page is
not the frame (an error page), and when it showed each cut with the
interruption notice (or last without it). The loop is bounded in count and time.
"""

from __future__ import annotations

import html
import importlib
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from prep_agent.rehearsal.viewer import Finding, fetch

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
STATE_JS = (
    "var b = document.body; var t = document.getElementById('cut-time');"
    "return [b ? b.getAttribute('data-state') : null, b ? b.getAttribute('data-sequence') : null,"
    " t ? t.getAttribute('datetime') : null];"
)

RELOAD_JS = "var f = document.getElementById(arguments[0]); f.src = f.src;"


def unavailable() -> str | None:
    """Why the browser viewer cannot run here (None: it can)."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        return "chromium and chromedriver are not installed"
    try:
        importlib.import_module("selenium.webdriver")
    except ImportError:
        return "selenium is not installed (requirements-dev.txt)"
    return None


@dataclass
class Frame:
    """What the browser saw of one difusor's frame."""

    service_id: str
    url: str
    first_seen: dict[int, float] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)
    samples: int = 0
    last: tuple[int, str] | None = None
    stale_shown: dict[int, float] = field(default_factory=dict)
    """Sequence → first time the frame showed it with the interruption notice."""
    last_current: dict[int, float] = field(default_factory=dict)
    """Sequence → last time the frame showed it as current (no notice)."""


@dataclass
class Browser:
    """The portal page in headless Chromium, in its own thread."""

    folder: Path
    frames: list[Frame]
    interval: float = 1.0
    error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    """Set once the portal was loaded and sampled (or the browser failed)."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _portal: subprocess.Popen[bytes] | None = None

    def start(self, port: int, max_seconds: float) -> None:
        """Serve the portal on ``port`` and sample it until ``stop`` or ``max_seconds``."""
        self.folder.mkdir(parents=True, exist_ok=True)
        iframes = "".join(
            f'<h2>{html.escape(f.service_id)}</h2><iframe id="prep-{html.escape(f.service_id)}" '
            f'src="{html.escape(f.url, quote=True)}/" width="640" height="360"></iframe>\n'
            for f in self.frames
        )
        (self.folder / "index.html").write_text(
            f'<!doctype html><html lang="es-MX"><meta charset="utf-8"><title>Portal</title>'
            f"<body><h1>Portal de noticias</h1>{iframes}</body></html>\n",
            encoding="utf-8",
        )
        self._portal = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
             str(self.folder), str(port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"http://127.0.0.1:{port}/"
        self._thread = threading.Thread(target=self._run, args=(max_seconds,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End sampling, quit the browser and the portal."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self._portal is not None:
            self._portal.terminate()
            self._portal.wait(timeout=10)

    def _driver(self) -> Any:
        webdriver = importlib.import_module("selenium.webdriver")
        service = importlib.import_module("selenium.webdriver.chrome.service")
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self.folder / 'perfil'}")
        options.add_argument("--window-size=1280,2000")
        driver = webdriver.Chrome(options=options, service=service.Service(CHROMEDRIVER))
        driver.set_page_load_timeout(20)
        driver.set_script_timeout(10)
        return driver

    def _run(self, max_seconds: float) -> None:
        deadline = time.monotonic() + max_seconds
        for _ in range(50):  # the portal server starts
            if fetch(self.url)[0] == 200:
                break
            time.sleep(0.1)
        try:
            driver = self._driver()
        except Exception as exc:
            self.error = f"the browser did not start: {exc!r}"[:300]
            self.ready.set()
            return
        try:
            driver.get(self.url)
            for _ in range(int(max_seconds / self.interval) + 1):
                if self._stop.is_set() or time.monotonic() > deadline:
                    break
                for frame in self.frames:
                    self._sample(driver, frame)
                self.ready.set()
                self._stop.wait(self.interval)
            driver.switch_to.default_content()
            driver.save_screenshot(str(self.folder / "portal.png"))
        except Exception as exc:
            self.error = f"the browser failed: {exc!r}"[:300]
        finally:
            self.ready.set()
            driver.quit()
            shutil.rmtree(self.folder / "perfil", ignore_errors=True)

    def _sample(self, driver: Any, frame: Frame) -> None:
        now = time.time()
        frame.samples += 1
        try:
            driver.switch_to.default_content()
            driver.switch_to.frame(driver.find_element("id", f"prep-{frame.service_id}"))
            state, sequence, cut_time = driver.execute_script(STATE_JS)
        except Exception as exc:
            frame.findings.append(Finding(now, "error", f"browser: {type(exc).__name__}"))
            return
        if state is None:  # an error page: noted, then reloaded as a reader would
            frame.findings.append(Finding(now, "error", "browser: the frame is not shown"))
            driver.switch_to.default_content()
            driver.execute_script(RELOAD_JS, f"prep-{frame.service_id}")
            return
        if not sequence:
            return
        seen = (int(sequence), str(cut_time))
        if frame.last is not None and (
            seen[0] < frame.last[0]
            or datetime.fromisoformat(seen[1]) < datetime.fromisoformat(frame.last[1])
        ):
            frame.findings.append(Finding(now, "backwards", f"browser: {frame.last} -> {seen}"))
        frame.last = seen
        frame.first_seen.setdefault(seen[0], now)
        if state == "stale":
            frame.stale_shown.setdefault(seen[0], now)
        elif state == "current":
            frame.last_current[seen[0]] = now
