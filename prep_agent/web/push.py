"""Health reports pushed to the institute (health-v1 §3).

One background thread per institute URL POSTs the full health document, signed
with the difusor's key (SSHSIG, namespace ``prep-health``) over the exact body
bytes, every ``period`` seconds and right after ``notify()``. Nothing is queued:
each attempt renders the newest document, so only the newest undelivered report
exists. Failures back off exponentially with jitter, capped at the period.

Publication only ever calls ``notify()``, which sets an event and returns: a
slow or silent institute delays nothing but its own thread.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from prep_agent.agent.journal import Journal
from prep_agent.core import sshkeys, sshsig
from prep_agent.core.errors import ConfigError, SignatureFormatError
from prep_agent.core.protocol import HEALTH_TYPE, NAMESPACE_HEALTH, SIGNATURE_HEADER
from prep_agent.shared.clock import Clock, utc_now

if TYPE_CHECKING:
    import requests  # type: ignore[import-untyped]  # no stubs in Debian 12

log = logging.getLogger(__name__)

RETRY_MIN = 1.0
"""Seconds of the first retry delay; it doubles on each consecutive failure."""

DocumentSource = Callable[[], dict[str, Any]]


def backoff_delay(failures: int, cap: float, rng: random.Random, base: float = RETRY_MIN) -> float:
    """Seconds to wait after ``failures`` consecutive failures (``failures`` ≥ 1).

    Exponential with "equal jitter": half the step is fixed, half random, so
    many difusores that lost the institute at once do not retry in lockstep.
    """
    step = min(cap, base * 2.0 ** min(failures - 1, 30))
    return step / 2 + rng.uniform(0, step / 2)


def load_push_key(path: Path) -> sshkeys.PrivateKey:
    """Read the difusor's unencrypted OpenSSH private key. Raises ``ConfigError``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"[push] cannot read key {path}: {exc.strerror}") from None
    try:
        return sshkeys.load_private_key(data)
    except SignatureFormatError as exc:
        raise ConfigError(f"[push] key {path}: {exc}") from None


def signed_report(
    doc: dict[str, Any], key: sshkeys.PrivateKey, previous: datetime | None, now: datetime
) -> tuple[bytes, str, datetime]:
    """The body, the ``PREP-Signature`` value and the ``time`` written.

    ``time`` gets millisecond precision and is kept strictly after ``previous``
    (the last report the institute accepted), so two reports in the same second
    are not mistaken for a replay.
    """
    moment = now if previous is None or now > previous else previous + timedelta(milliseconds=1)
    report = dict(doc)
    report["time"] = moment.astimezone(timezone.utc).isoformat(timespec="milliseconds")
    body = json.dumps(report, ensure_ascii=False).encode("utf-8")
    blob = sshsig.sign(key, body, NAMESPACE_HEALTH)
    return body, base64.b64encode(blob).decode("ascii"), moment


class _Target:
    """Delivery to one institute URL, in its own thread."""

    def __init__(self, pusher: Pusher, url: str) -> None:
        self.pusher = pusher
        self.url = url
        self.wake = threading.Event()
        self.failures = 0
        self.failing_since: datetime | None = None
        self.retry_at = 0.0
        # Only accepted reports bind later times: one refused for a clock far ahead
        # must not hold the next ones back once the clock is right again.
        self.accepted_time: datetime | None = None
        self.thread = threading.Thread(target=self.loop, name=f"push {url}", daemon=True)

    def loop(self) -> None:
        # Imported here: requests is a fifth of a command's start-up, and only an
        # agent that pushes its health needs it.
        import requests  # type: ignore[import-untyped]  # no stubs in Debian 12

        p = self.pusher
        session = requests.Session()
        rng = random.Random()
        delay = 0.0
        try:
            while not p.stop_event.is_set():
                woke = self.wake.wait(delay)
                if p.stop_event.is_set():
                    return
                if woke and self.failures:
                    # A publication during backoff: the next attempt (on time) carries it.
                    self.wake.clear()
                    delay = max(0.0, self.retry_at - time.monotonic())
                    continue
                self.wake.clear()
                if self.attempt(session):
                    delay = p.period
                else:
                    wait = backoff_delay(self.failures, p.period, rng)
                    self.retry_at = time.monotonic() + wait
                    delay = wait
        finally:
            session.close()

    def attempt(self, session: requests.Session) -> bool:
        """POST the newest document once; True if the institute accepted it."""
        import requests  # type: ignore[import-untyped]  # no stubs in Debian 12

        p = self.pusher
        moment = None
        try:
            body, signature, moment = p.render(self.accepted_time)
            response = session.post(
                self.url,
                data=body,
                headers={"Content-Type": HEALTH_TYPE, SIGNATURE_HEADER: signature},
                timeout=(p.connect_timeout, p.read_timeout),
                allow_redirects=False,
            )
            response.close()
            problem = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            problem = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # never let the thread die: health would show no delivery
            log.error("report to %s failed unexpectedly", self.url, exc_info=True)
            problem = f"internal error: {exc!r}"
        if problem is None:
            self.accepted_time = moment
            self.delivered()
            return True
        self.failed(problem)
        return False

    def delivered(self) -> None:
        p = self.pusher
        p.mark_accepted()
        if self.failures:
            p.journal.write(
                "report-restored",
                url=self.url,
                failures=self.failures,
                failing_since=_iso(self.failing_since),
            )
        self.failures = 0
        self.failing_since = None

    def failed(self, problem: str) -> None:
        self.failures += 1
        log.debug("report to %s failed (%d): %s", self.url, self.failures, problem)
        if self.failures == 1:
            self.failing_since = self.pusher.clock()
            # One journal line per outage, not one per retry.
            self.pusher.journal.write("report-failing", url=self.url, detail=problem[:500])


class Pusher:
    """Pushes signed health reports to every configured institute URL.

    Report times and outage starts are read from ``clock``.
    """

    def __init__(
        self,
        urls: Sequence[str],
        key: sshkeys.PrivateKey,
        document: DocumentSource,
        journal: Journal,
        period: float = 60.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 10.0,
        clock: Clock = utc_now,
    ) -> None:
        self.key = key
        self.clock = clock
        self.document = document
        self.journal = journal
        self.period = period
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._accepted_at: float | None = None
        self._targets = [_Target(self, url) for url in urls]

    def render(self, after: datetime | None = None) -> tuple[bytes, str, datetime]:
        """The newest document, signed, and its ``time``: now, or 1 ms after ``after``
        (the last report the institute accepted) if the clock is not past it."""
        return signed_report(self.document(), self.key, after, self.clock())

    def mark_accepted(self) -> None:
        """Record that an institute accepted a report now."""
        with self._lock:
            self._accepted_at = time.monotonic()

    def last_accepted_age(self) -> float | None:
        """Seconds since the last report an institute accepted, or None."""
        with self._lock:
            accepted = self._accepted_at
        return None if accepted is None else round(time.monotonic() - accepted, 3)

    def start(self) -> None:
        """Start one delivery thread per URL; the first report goes at once."""
        for target in self._targets:
            target.thread.start()

    def notify(self) -> None:
        """Ask for a report now (after a publication or rejection); never blocks."""
        for target in self._targets:
            target.wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the threads; a request in flight is abandoned (daemon threads)."""
        self.stop_event.set()
        self.notify()
        deadline = time.monotonic() + timeout
        for target in self._targets:
            if target.thread.is_alive():
                target.thread.join(max(0.0, deadline - time.monotonic()))


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat(timespec="seconds") if moment else None
