"""Every target in parallel: a bounded pool, retries with backoff, supersession.

Each target wants the newest cut offered. A scheduler thread starts attempts
when they are due; an attempt first opens the target's connection (a target
that does not answer waits out its connect timeout without holding a slot),
then sends while holding one of ``workers`` transfer slots, in up to
``SESSIONS`` concurrent sftp sessions over that connection when it sends many
files (a session waits on a round trip per file most of the time); a failed attempt is retried
with exponential backoff (capped at ``backoff_max``) until ``retry_for`` has
passed, unless its reason cannot heal by itself (a refused host key or
login). A newer cut supersedes an older one: an upload of the older cut still
running is stopped and the target goes straight to the newest cut, never the
backlog. After a delivery, the target's public status.json is read until it
shows the cut (bounded), and the delivered → published latency recorded.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import requests  # type: ignore[import-untyped]  # no stubs in Debian 12

from prep_agent.core.errors import Error
from prep_agent.institute.collector.config import DistributeSettings
from prep_agent.institute.collector.deliveries import (
    DELIVERED,
    FAILED,
    SUPERSEDED,
    Attempt,
    DeliveryLog,
)
from prep_agent.institute.delivery import batch_lines, folders_of
from prep_agent.institute.distribution.local import LocalCut
from prep_agent.institute.distribution.transport import (
    Cancelled,
    DeliveryError,
    Link,
    close_master,
    connect,
    run_batch,
    run_batches,
)

log = logging.getLogger(__name__)

CONFIRM_POLL = 0.5
"""Seconds between two reads of a difusor's status.json while confirming."""
FIRST_BACKOFF = 1.0
"""Seconds before the first retry; each later one waits twice as long."""
SESSIONS = 3
"""At most this many sftp sessions send one target's files at once."""
FILES_PER_SESSION = 200
"""One more session (up to ``SESSIONS``) for every this many files to send."""
SLOT_POLL = 0.05
"""Seconds between two looks at cancellation while waiting for a transfer slot."""


@dataclass
class _Target:
    """The scheduler's view of one target (guarded by the distributor's condition)."""

    cut: LocalCut | None = None
    deadline: float = 0.0
    tries: int = 0
    due: float | None = None
    running: bool = False
    sending: LocalCut | None = None
    held: int | None = None
    error: str | None = None
    started: float | None = None


@dataclass(frozen=True)
class Outcome:
    """Where one target stands for a cut."""

    service_id: str
    held: bool
    error: str | None


@dataclass(frozen=True)
class Event:
    """One thing that happened, for the command line's progress and log lines."""

    kind: str
    service_id: str
    sequence: int
    seconds: float
    detail: str = ""
    files: int = 0
    bytes: int = 0


class Distributor:
    """Delivers offered cuts to ``links`` until held, superseded or given up."""

    def __init__(
        self,
        links: Mapping[str, Link],
        status_urls: Mapping[str, str | None],
        settings: DistributeSettings,
        records: DeliveryLog,
        report: Callable[[Event], None] = lambda event: None,
        confirm: bool = True,
    ) -> None:
        self.links = dict(links)
        self.status_urls = dict(status_urls)
        self.settings = settings
        self.records = records
        self.report = report
        self.confirm = confirm
        self._cond = threading.Condition()
        self._targets = {sid: _Target() for sid in self.links}
        self._closing = False
        self._confirm_deadline = 0.0
        # A thread per target (each has at most one attempt running); the transfer
        # slots, not the threads, bound how many send at once.
        self._pool = ThreadPoolExecutor(max(1, len(self.links)), thread_name_prefix="deliver")
        self._slots = threading.BoundedSemaphore(settings.workers)
        self._confirms = ThreadPoolExecutor(settings.workers, thread_name_prefix="confirm")
        self._thread = threading.Thread(target=self._loop, name="distribute", daemon=True)
        self._thread.start()

    # --- offering and waiting -----------------------------------------------------------

    def offer(self, cut: LocalCut) -> None:
        """Make ``cut`` the one every target not holding it (or newer) should receive."""
        now = time.monotonic()
        with self._cond:
            for sid, target in self._targets.items():
                held = self.records.acked_sequence(sid)
                target.held = held
                if held is not None and held >= cut.sequence:
                    continue
                target.cut = cut
                target.deadline = now + self.settings.retry_for
                target.tries = 0
                target.error = None
                if not target.running:
                    target.due = now
            self._cond.notify_all()

    def pending(self) -> bool:
        """Whether any target still has an attempt running or scheduled."""
        with self._cond:
            return self._pending()

    def _pending(self) -> bool:
        return any(t.running or t.due is not None for t in self._targets.values())

    def in_use(self) -> list[LocalCut]:
        """The cuts some target still wants or is being sent."""
        with self._cond:
            wanted = [t.cut for t in self._targets.values() if t.cut is not None]
            wanted += [t.sending for t in self._targets.values() if t.sending is not None]
            return wanted

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no attempt is running or scheduled; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending(), timeout)

    def outcomes(self, sequence: int) -> list[Outcome]:
        """Whether each target holds ``sequence`` (or newer), and its last error."""
        with self._cond:
            return [
                Outcome(sid, t.held is not None and t.held >= sequence, t.error)
                for sid, t in sorted(self._targets.items())
            ]

    def close(self, wait_confirmations: float = 0.0) -> None:
        """Stop: cancel running uploads, let confirmations finish for up to
        ``wait_confirmations`` seconds, close every multiplexed connection."""
        self._confirm_deadline = time.monotonic() + wait_confirmations
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self._pool.shutdown(wait=True)
        self._confirms.shutdown(wait=True)
        for link in self.links.values():
            close_master(link)

    # --- the scheduler ------------------------------------------------------------------

    def _loop(self) -> None:
        with self._cond:
            while not self._closing:
                now = time.monotonic()
                dues = [t.due for t in self._targets.values() if t.due is not None]
                for sid, target in self._targets.items():
                    if target.due is not None and target.due <= now and not target.running:
                        target.due = None
                        target.running = True
                        self._pool.submit(self._attempt, sid)
                future = [d for d in dues if d > now]
                self._cond.wait(min(future) - now if future else 1.0)

    def _attempt(self, sid: str) -> None:
        with self._cond:
            target = self._targets[sid]
            cut = target.sending = target.cut
            target.tries += 1
            first = target.tries == 1
        assert cut is not None
        link = self.links[sid]
        send: list[str] | None = None
        started = time.time()
        error: Error | None = None
        result = DELIVERED

        def cancelled() -> bool:
            return self._closing or target.cut is not cut

        try:
            connect(link, 2 * self.settings.connect_timeout + 5, cancelled)
            with self._slot(cancelled):
                # Listed only now: a target waiting for a slot holds no list of its files.
                send, existing = self._plan(sid, cut, first)
                self._send(link, cut, send, existing, cancelled)
        except Cancelled as exc:
            result, error = SUPERSEDED, exc
            if self._closing:
                error = Cancelled("stopped before the upload ended (distribute was stopped)")
        except (Error, OSError) as exc:
            result = FAILED
            error = exc if isinstance(exc, Error) else DeliveryError(f"local: {exc}")
        ended = time.time()
        # Files and bytes of the batch: all sent when delivered, an upper bound otherwise.
        send = self._plan(sid, cut, False)[0] if send is None else send
        size = sum(cut.sizes[p] for p in send)
        reason = str(error) if error is not None else None
        attempt = Attempt(sid, cut.sequence, started, ended, len(send), size, result, reason)
        self.records.record_attempt(attempt, cut.files, cut.ready_at)
        self.report(
            Event(result, sid, cut.sequence, ended - started, str(error or ""), len(send), size)
        )
        if result == DELIVERED and self.confirm and self.status_urls.get(sid):
            self._confirms.submit(self._confirm, sid, cut.sequence, ended)
        self._settle(sid, cut, error)

    def _plan(self, sid: str, cut: LocalCut, first: bool) -> tuple[list[str], set[str]]:
        """The files of ``cut`` the target's last acknowledged cut lacks (by hash),
        and the folders it holds already: those of its acknowledged files (the
        agent never deletes in its drop folder, prep-cut-v1 §1.4), on a first
        attempt only, so a retry makes every folder again in case someone else did."""
        acked = self.records.target(sid).acked_files
        send = [path for path, sha in cut.files.items() if acked.get(path) != sha]
        return send, folders_of(acked) if first else set()

    @contextmanager
    def _slot(self, cancelled: Callable[[], bool]) -> Iterator[None]:
        """Hold one of the ``workers`` transfer slots. Raises ``Cancelled``."""
        while not self._slots.acquire(timeout=SLOT_POLL):
            if cancelled():
                raise Cancelled("superseded by a newer cut")
        try:
            yield
        finally:
            self._slots.release()

    def _send(
        self,
        link: Link,
        cut: LocalCut,
        send: list[str],
        existing: set[str],
        cancelled: Callable[[], bool],
    ) -> None:
        """Upload ``send`` and then the manifest and the signature (renamed last),
        making the folders not in ``existing``.

        Many files go in up to ``SESSIONS`` batches at once, each a contiguous
        run of the sorted paths (few shared folders), and the manifest and
        signature in one more batch once all of them have succeeded. Raises
        ``Error`` or ``OSError``.
        """
        timeout = self.settings.transfer_timeout
        folder, path = cut.folder, link.target.path
        view = cut.view(send)
        count = min(SESSIONS, math.ceil(len(send) / FILES_PER_SESSION))
        if count <= 1:
            lines = batch_lines(folder, path, send, cut.local, True, existing, view)
            run_batch(link, lines, timeout, cancelled)
            return
        ordered = sorted(send)
        size = math.ceil(len(ordered) / count)
        parts = [
            batch_lines(folder, path, ordered[i : i + size], cut.local, False, existing, view)
            for i in range(0, len(ordered), size)
        ]
        last = batch_lines(folder, path, [], cut.local)
        run_batches(link, parts, last, timeout, cancelled)

    def _settle(self, sid: str, cut: LocalCut, error: Error | None) -> None:
        """After an attempt: done, retry later, switch to a newer cut, or give up."""
        now = time.monotonic()
        with self._cond:
            target = self._targets[sid]
            target.running = False
            target.sending = None
            if error is None:
                target.held = cut.sequence
                target.error = None
            else:
                target.error = str(error)
            if self._closing:
                pass
            elif target.cut is not cut:
                target.due = now
            elif error is not None and not isinstance(error, Cancelled):
                retry = not isinstance(error, DeliveryError) or error.retry
                backoff = min(self.settings.backoff_max, FIRST_BACKOFF * 2 ** (target.tries - 1))
                if retry and now + backoff < target.deadline:
                    target.due = now + backoff
            self._cond.notify_all()

    # --- confirmation -------------------------------------------------------------------

    def _confirm(self, sid: str, sequence: int, delivered: float) -> None:
        """Read the difusor's status.json until it shows ``sequence`` (bounded)."""
        url = self.status_urls[sid]
        assert url is not None
        deadline = delivered + self.settings.confirm_timeout
        timeout = min(5.0, self.settings.connect_timeout)
        with requests.Session() as session:
            while time.time() < deadline:
                if self._closing and time.monotonic() > self._confirm_deadline:
                    return
                try:
                    shown = session.get(url, timeout=timeout, allow_redirects=False).json()
                except (requests.RequestException, ValueError):
                    shown = None
                seq = shown.get("sequence") if isinstance(shown, dict) else None
                if isinstance(seq, int) and seq >= sequence:
                    at = time.time()
                    self.records.record_published(sid, seq, at)
                    self.report(Event("published", sid, seq, at - delivered))
                    return
                time.sleep(CONFIRM_POLL)
        self.report(Event("unconfirmed", sid, sequence, time.time() - delivered))
