"""The host's readings for the full health view (health-v1 §1): disk, memory, CPU.

The one place the difusor reads the host (psutil). The agent takes one reading
per full health document (a privileged ``/health``, a push); the public view
never reads the host. ``health`` turns the reading into checks.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import psutil

from prep_agent.web.health import SystemReadings

CPU_WINDOW = 10.0
"""Shortest span (seconds) a CPU reading averages over: a reading sooner than this
after the previous one repeats its value, so two documents a moment apart do not
report the load of a few milliseconds."""


class SystemProbe:
    """Reads the file system holding ``storage``, memory, and CPU busy since the
    previous reading (thread-safe; ``clock`` is monotonic seconds)."""

    def __init__(self, storage: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.storage = storage
        self._clock = clock
        self._lock = threading.Lock()
        self._cpu_since: float | None = None
        self._cpu: float | None = None

    def read(self) -> SystemReadings:
        """One reading of the host. Raises ``OSError`` if ``storage`` cannot be examined."""
        return SystemReadings(
            disk_percent=psutil.disk_usage(str(self.storage)).percent,
            memory_percent=psutil.virtual_memory().percent,
            cpu_percent=self._cpu_percent(),
        )

    def _cpu_percent(self) -> float | None:
        with self._lock:
            now = self._clock()
            if self._cpu_since is None or now - self._cpu_since >= CPU_WINDOW:
                busy = float(psutil.cpu_percent(interval=None))
                # The first call only opens the window: psutil's value then means nothing.
                self._cpu = busy if self._cpu_since is not None else None
                self._cpu_since = now
            return self._cpu
