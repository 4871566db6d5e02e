"""The agent: the I/O shell around the verification core.

One ``step()`` looks at the drop folder once: reads the signature and the
manifest, decides with ``verify.decide``, builds and swaps the release, and
records the outcome (journal, state, quarantine). ``run()`` repeats it on file
events and periodic rescans until stopped. With ``[source] type =
https-package`` a step is one poll of the institute's URL (``agent/fetch.py``)
and the publication of a new package (``agent/package_store.py``), repeated
every ``poll_seconds`` (longer after errors).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from prep_agent.agent.config import Config
from prep_agent.agent.floor import JournalFloor, checked_state
from prep_agent.agent.intake import FileIdentity, Pending, Watcher, read_delivery, sequence_hint
from prep_agent.agent.journal import Journal, write_published
from prep_agent.agent.lock import LockFile
from prep_agent.agent.state import Rejected, State, save_state
from prep_agent.agent.store import Release, Store
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.core.errors import (
    SIGNATURE_MALFORMED,
    SIGNATURE_UNTRUSTED,
    ConfigError,
    Error,
    Rejection,
    SignatureFormatError,
)
from prep_agent.core.verify import Decision, Policy, Published, decide
from prep_agent.shared.clock import Clock, utc_now
from prep_agent.shared.httpserver import Server
from prep_agent.shared.notify import sd_notify
from prep_agent.web.frame import install_static, stale_deadline, write_public
from prep_agent.web.health import Metrics, Snapshot, health_document
from prep_agent.web.purge import Purger
from prep_agent.web.push import Pusher, load_push_key
from prep_agent.web.server import build_app, make_server, write_nginx_snippets
from prep_agent.web.system import SystemProbe

if TYPE_CHECKING:
    from prep_agent.agent.fetch import Fetcher
    from prep_agent.agent.package_store import PackageIntake

log = logging.getLogger(__name__)

UNVERIFIED_REASONS = (SIGNATURE_MALFORMED, SIGNATURE_UNTRUSTED)
"""Failures found before the signature verified: the same signature and manifest
files give the same verdict until the trust changes."""


@dataclass(frozen=True)
class Outcome:
    """What one step did: ``idle``, ``waiting``, ``published``, ``replay``, ``rejected``,
    ``source-error`` (https-package: the poll failed) or (daemon only) ``error``."""

    status: str
    sequence: int | None = None
    rejection: Rejection | None = None


def published_view(store: Store, state: State) -> Published:
    """What is published (from ``current``) and the rollback floor (from the state,
    as ``floor.checked_state`` raised it, and never below ``current``)."""
    current = store.current()
    sequence = current.manifest.sequence if current else None
    return Published(
        sequence=sequence,
        cut_time=current.manifest.cut_time if current else None,
        highest_sequence=max(state.highest_sequence, sequence or 0),
        highest_manifest_sha256=state.highest_manifest_sha256,
    )


def load_policy(config: Config) -> Policy:
    """Build the verification policy from the config and its allowed_signers file.

    Raises ``ConfigError``.
    """
    try:
        text = config.trust.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read allowed_signers {config.trust}: {exc.strerror}") from None
    try:
        signers = tuple(parse_allowed_signers(text))
    except SignatureFormatError as exc:
        raise ConfigError(f"allowed_signers {config.trust}: {exc}") from None
    if not signers:
        raise ConfigError(f"allowed_signers {config.trust} lists no key")
    return Policy(
        election=config.election,
        signers=signers,
        threshold=config.threshold,
        max_clock_skew=config.max_clock_skew,
        limits=config.limits,
    )


class Agent:
    """Accepts cuts from the drop folder and publishes them (one per root).

    ``clock`` is the only clock below the agent: verification, the frame's
    freshness, journal times, quarantine names and health reports all read it.
    """

    def __init__(self, config: Config, clock: Clock = utc_now) -> None:
        self.config = config
        self.layout = config.layout
        self.clock = clock
        self.policy = load_policy(config)
        self._trust_stamp = _file_stamp(config.trust)
        self.store = Store(self.layout, config.limits, clock)
        self.journal = Journal(self.layout.journal_file, clock)
        self.journal_floor = JournalFloor(self.layout.journal_file)
        self.pending: Pending | None = None
        self.stop_event = threading.Event()
        self._watcher: Watcher | None = None
        self._stale_written: str | None = None
        self.metrics = Metrics(instance=config.instance)
        self.system = SystemProbe(config.root)
        self.pusher: Pusher | None = None
        self.purger: Purger | None = None
        self._running = False
        self._scanned = False  # the drop folder (or source) looked at since start
        self._failing: tuple[int, str | None] = (0, None)
        self.store.ensure_layout()
        if not self.store.release_names() and not self.layout.state_file.exists():
            # From the first release on, a missing state file means it was lost.
            save_state(self.layout.state_file, State())
        self.state = self._load_state()
        install_static(config)
        write_nginx_snippets(config)
        self.shown = self.store.current_name()
        write_public(config, self.store.current(), clock())
        self.packages: PackageIntake | None = None
        if config.source.type == "https-package":
            # Imported here: the https source loads requests, a fifth of a command's
            # start-up, which an agent watching its drop folder never needs.
            from prep_agent.agent.fetch import Fetcher, settings_of
            from prep_agent.agent.package_store import PackageIntake

            fetcher = Fetcher(settings_of(config.source), self.policy.signers, config.threshold)
            self.packages = PackageIntake(
                config, self.store, self.journal, self.metrics, clock, self._show, fetcher
            )
            self.packages.notify = self._notify_push

    def _load_state(self) -> State:
        """Read the state; if ``current`` or the journal shows a higher floor (a crash
        between swap and state write, §5; a state file older than the journal),
        raise it and write it.

        Raises ``Error`` (with the recovery command) if releases exist and the
        state file is missing or unreadable, ``OSError``.
        """
        state, raised = checked_state(self.layout.state_file, self.store, self.journal_floor)
        if raised:
            save_state(self.layout.state_file, state)
        return state

    def published(self) -> Published:
        """The verification core's view of what is published."""
        return published_view(self.store, self.state)

    def step(self, settle: bool = True) -> Outcome:
        """Look at the drop folder once and act on a new cut, if any.

        Holds the publication lock, so operator actions (rollback,
        reset-sequence) never interleave with a publication. With the
        https-package source: one poll and its package (``_package_step``).
        """
        if self.packages is not None:
            return self._package_step(self.packages)
        with LockFile(self.layout.publish_lock_file, blocking=True):
            self.state = self._load_state()
            self._refresh_policy()
            self._refresh_public()
            return self._step(settle)

    def _show(self, release: Release | None) -> None:
        """Rewrite the frame and status.json for what is now current."""
        write_public(self.config, release, self.clock())
        self.shown = release.name if release else None

    def _refresh_public(self) -> None:
        """Keep the public files true to ``current``: after an operator rollback,
        and once the cut turns stale (for readers without JavaScript)."""
        current = self.store.current()
        name = current.name if current else None
        deadline = stale_deadline(current, self.config.stale_periods)
        due = deadline is not None and self.clock() >= deadline and self._stale_written != name
        if name != self.shown or due:
            self._show(current)
            self._stale_written = name if due else self._stale_written

    def _refresh_policy(self) -> None:
        """Reload allowed_signers when the file changed (key rotation without restart).

        An invalid new file is journaled and the previous trust is kept.
        """
        stamp = _file_stamp(self.config.trust)
        if stamp == self._trust_stamp:
            return
        self._trust_stamp = stamp
        if self.pending is not None:
            self.pending.judged = self.pending.decided = None  # the trust decides anew
        try:
            self.policy = load_policy(self.config)
        except ConfigError as exc:
            self.journal.write("trust-error", detail=str(exc))
            return
        self.journal.write("trust-reloaded", keys=len(self.policy.signers))
        if self.packages is not None:
            self.packages.fetcher.signers = self.policy.signers

    def _step(self, settle: bool) -> Outcome:
        decided = self.state.last_decided_signature
        judged = self._judged(settle)
        delivery = read_delivery(self.config.inbox, self.config.limits, decided, judged)
        sig_id = delivery.signature_id
        if sig_id is None or sig_id == decided:
            return Outcome("idle")
        if self.pending is None or self.pending.signature_sha256 != sig_id:
            self._supersede(sig_id)
        if delivery.unchanged and self.pending is not None and self.pending.verdict:
            return Outcome("waiting", rejection=self.pending.verdict)
        try:
            manifest_bytes, sig_bytes = delivery.contents()
            return self._accept(manifest_bytes, sig_bytes, sig_id)
        except Rejection as raised:
            rejection = _verdict(raised)
            if self.pending is not None and rejection.reason in UNVERIFIED_REASONS:
                identity = delivery.manifest_identity
                self.pending.judged = (sig_id, identity) if identity else None
                self.pending.verdict = rejection
            return self._refuse(rejection, delivery.manifest, delivery.signature, settle)

    def _package_step(self, packages: PackageIntake) -> Outcome:
        """One poll of the https-package source and the decision on its package."""
        with LockFile(self.layout.publish_lock_file, blocking=True):
            self._refresh_policy()
            self._refresh_public()
        done, state = packages.poll(self._load_state)
        self.state = state or self.state
        if done.status == "published":
            self._purge()
        return Outcome(done.status, done.sequence, done.rejection)

    def _judged(self, settle: bool) -> tuple[str, FileIdentity] | None:
        """The unverified attempt whose verdict still holds while its files are
        unchanged; None once the cut has settled: the final verdict is always
        made on a fresh reading."""
        pending = self.pending
        if not settle or pending is None or pending.judged is None:
            return None
        if pending.settled(time.monotonic(), self.config.settle_timeout):
            return None
        return pending.judged

    def _supersede(self, sig_id: str) -> None:
        if self.pending is not None:
            self.journal.write("cut-superseded", signature_sha256=self.pending.signature_sha256)
        self.pending = Pending(sig_id, time.monotonic())
        self.journal.write("cut-seen", signature_sha256=sig_id)

    def _decide(self, manifest_bytes: bytes, sig_bytes: bytes) -> Decision:
        """``decide``, or the settling cut's last decision if its manifest bytes and
        what is published are the same (and the trust was not reloaded since): a cut
        waiting for its files is not verified and parsed again at every retry."""
        pending = self.pending
        published = self.published()
        if pending is not None and pending.decided is not None:
            before, decision = pending.decided
            digest = hashlib.sha256(manifest_bytes).hexdigest()
            if before == published and decision.manifest_sha256 == digest:
                return decision
        decision = decide(manifest_bytes, sig_bytes, self.policy, published, self.clock())
        if pending is not None:
            pending.decided = (published, decision)
        return decision

    def _accept(self, manifest_bytes: bytes, sig_bytes: bytes, sig_id: str) -> Outcome:
        started = time.monotonic()
        decision = self._decide(manifest_bytes, sig_bytes)
        manifest = decision.manifest
        if decision.already_published:
            self.journal.write("cut-replay", sequence=manifest.sequence)
            self._decided(sig_id)
            return Outcome("replay", manifest.sequence)
        verified = time.monotonic()
        release, copied = self.store.build(
            manifest,
            manifest_bytes,
            sig_bytes,
            self.config.inbox,
            self.config.stamp_check,
            self._warn_stamp,
            decision.manifest_sha256,
        )
        built = time.monotonic()
        self.store.swap(release.name)
        swapped = time.monotonic()
        self._show(release)
        self.state = replace(
            self.state,
            highest_sequence=manifest.sequence,
            highest_manifest_sha256=decision.manifest_sha256,
            last_decided_signature=sig_id,
        )
        save_state(self.layout.state_file, self.state)
        self._journal_published(
            release, decision.signers, copied, started, verified, built, swapped
        )
        self._notify_push()
        self._purge()
        self.pending = None
        pruned = self.store.prune(self.config.keep_releases, self.config.keep_replaced_seconds)
        if pruned:
            self.journal.write("releases-pruned", releases=pruned)
        return Outcome("published", manifest.sequence)

    def snapshot(self, full: bool = False) -> Snapshot:
        """What health and metrics report, read from ``current`` and the state; with
        ``full``, also one reading of the host (disk, memory, CPU) for the full view."""
        current = self.store.current()
        watcher = self._watcher
        alive = self._running and (watcher is None or watcher.alive())
        failing = self._failing
        return Snapshot(
            now=self.clock(),
            service_id=self.config.service_id,
            manifest=current.manifest if current else None,
            manifest_sha256=current.manifest_sha256 if current else None,
            stale_periods=self.config.stale_periods,
            last_rejection=self.state.last_rejection,
            watcher_mode=watcher.mode if watcher else "polling",
            watcher_fallback=bool(watcher and watcher.failure),
            agent_alive=alive,
            scanned=self._scanned,
            storage_writable=os.access(self.layout.releases, os.W_OK),
            last_report_age=self.pusher.last_accepted_age() if self.pusher else None,
            push_configured=bool(self.config.push_urls),
            system=self.system.read() if full else None,
            failed_steps=failing[0],
            last_error=failing[1],
            source_polled=self.packages is not None,
            source_error=self.packages.source_error if self.packages is not None else None,
        )

    def _purge(self) -> None:
        """Soft-purge the pointers on the configured caches; returns at once, so it
        never delays publication."""
        if self.purger is not None:
            self.purger.notify()

    def _notify_push(self) -> None:
        """Ask for a health report now (health-v1 §3); returns at once."""
        if self.pusher is not None:
            self.pusher.notify()

    def _make_pusher(self) -> Pusher | None:
        """The health report pusher if ``[push] urls`` is set. Raises ``ConfigError``."""
        c = self.config
        if not c.push_urls or c.push_key is None:
            return None
        return Pusher(
            c.push_urls,
            load_push_key(c.push_key),
            lambda: health_document(self.snapshot(full=True)),
            self.journal,
            period=c.push_period,
            connect_timeout=c.push_connect_timeout,
            read_timeout=c.push_read_timeout,
            clock=self.clock,
        )

    def _warn_stamp(self, text: str) -> None:
        self.journal.write("stamp-warning", detail=text)

    def _journal_published(
        self,
        release: Release,
        signers: tuple[str, ...],
        copied: int,
        started: float,
        verified: float,
        built: float,
        swapped: float,
    ) -> None:
        self.metrics.observe_publish(swapped - started)
        waited = time.monotonic() - self.pending.first_seen if self.pending else 0.0
        steps = {
            "verify_ms": (verified - started) * 1000,
            "build_ms": (built - verified) * 1000,
            "swap_ms": (swapped - built) * 1000,
            "total_ms": (swapped - started) * 1000,
            "since_seen_ms": waited * 1000,
        }
        write_published(self.journal, release, signers, copied, steps)

    def _refuse(
        self,
        rejection: Rejection,
        manifest_bytes: bytes | None,
        sig_bytes: bytes | None,
        settle: bool,
    ) -> Outcome:
        pending = self.pending
        retry = rejection.transient and settle and pending is not None
        if retry and pending and not pending.settled(time.monotonic(), self.config.settle_timeout):
            if pending.last_reason != rejection.reason:
                pending.last_reason = rejection.reason
                self.journal.write("cut-waiting", reason=rejection.reason, detail=rejection.detail)
            return Outcome("waiting", rejection=rejection)
        sequence = sequence_hint(manifest_bytes)
        folder = self.store.quarantine(
            rejection,
            manifest_bytes,
            sig_bytes,
            sequence,
            self.config.keep_quarantine,
            self.config.keep_quarantine_bytes,
        )
        now = self.clock().isoformat(timespec="seconds")
        self.state = replace(
            self.state,
            last_rejection=Rejected(now, rejection.reason, rejection.detail, sequence),
            last_decided_signature=pending.signature_sha256 if pending else None,
        )
        save_state(self.layout.state_file, self.state)
        self.metrics.count_rejection(rejection.reason)
        self.journal.write(
            "cut-rejected",
            reason=rejection.reason,
            detail=rejection.detail,
            sequence=sequence,
            quarantine=str(folder),
        )
        self._notify_push()
        self.pending = None
        return Outcome("rejected", sequence, rejection)

    def _decided(self, sig_id: str) -> None:
        self.state = replace(self.state, last_decided_signature=sig_id)
        save_state(self.layout.state_file, self.state)
        self.pending = None

    def run(self, once: bool = False) -> Outcome:
        """Process the drop folder until ``stop()`` (or once, without settling)."""
        if once:
            return self.step(settle=False)
        pusher = self._make_pusher()
        if self.packages is not None:
            return self._run_polling(self.packages.fetcher, pusher)
        watcher = Watcher(self.config.inbox, on_change=self._watcher_changed)
        self._watcher = watcher
        watcher.start()
        self._start_senders(pusher)
        self.journal.write("agent-started", watcher=watcher.mode, failure=watcher.failure)
        outcome = Outcome("idle")
        try:
            ready = False
            while not self.stop_event.is_set():
                outcome = self._safe_step()
                self._scanned = True
                # READY=1 after the first full scan; WATCHDOG=1 from the main loop.
                sd_notify("WATCHDOG=1" if ready else "READY=1\nSTATUS=watching the drop folder")
                ready = True
                if outcome.status == "waiting":
                    # An upload is in progress: retry on its events, at most 5 times a second.
                    self.stop_event.wait(0.2)
                    watcher.wait(0.5)
                else:
                    watcher.wait(self.config.rescan_interval)
        finally:
            self._stop_senders()
            watcher.stop()
            self.journal.write("agent-stopped")
        return outcome

    def _run_polling(self, fetcher: Fetcher, pusher: Pusher | None) -> Outcome:
        """``run`` for the https-package source: a poll every ``fetcher.delay()``
        seconds and, between polls, the public files kept true every
        ``rescan_interval`` (an operator rollback, the cut turning stale)."""
        self._start_senders(pusher)
        self.journal.write("agent-started", source="https-package", url=self.config.source.url)
        outcome = Outcome("idle")
        next_poll = 0.0
        try:
            ready = False
            while not self.stop_event.is_set():
                if time.monotonic() >= next_poll:
                    outcome = self._safe_step()
                    self._scanned = True
                    next_poll = time.monotonic() + fetcher.delay()
                else:
                    with LockFile(self.layout.publish_lock_file, blocking=True):
                        self._refresh_public()
                sd_notify("WATCHDOG=1" if ready else "READY=1\nSTATUS=polling the package URL")
                ready = True
                wait = min(self.config.rescan_interval, next_poll - time.monotonic())
                self.stop_event.wait(max(0.0, wait))
        finally:
            self._stop_senders()
            self.journal.write("agent-stopped")
        return outcome

    def _start_senders(self, pusher: Pusher | None) -> None:
        """Start the health pusher and the cache purger, if configured."""
        self._running = True
        if pusher is not None:
            self.pusher = pusher
            pusher.start()
        if self.config.purge_nodes:
            c = self.config
            self.purger = Purger(c.purge_nodes, self.metrics, c.purge_timeout, c.purge_delay)
            self.purger.start()

    def _stop_senders(self) -> None:
        sd_notify("STOPPING=1")
        self._running = False
        if self.pusher is not None:
            self.pusher.stop()
        if self.purger is not None:
            self.purger.stop()

    def _watcher_changed(self, event: str, detail: str) -> None:
        """Journal a watch lost or re-armed (``watcher-lost``, ``watcher-rearmed``)."""
        self.journal.write(event, detail=detail)

    def _safe_step(self) -> Outcome:
        """``step()`` for the daemon: a failure of ours (disk full, I/O error) is
        journaled and retried on the next rescan; the published cut stays. Failures
        in a row are counted for health (``agent:publication``)."""
        try:
            outcome = self.step()
        except (OSError, Error) as exc:
            log.error("publication failed: %s", exc, exc_info=True)
            detail = " ".join(str(exc).split())
            self.journal.write("agent-error", detail=detail)
            self._failing = (self._failing[0] + 1, detail)
            return Outcome("error")
        if self._failing[0]:
            self.journal.write("agent-recovered", failed_steps=self._failing[0])
            self._failing = (0, None)
        return outcome

    def stop(self) -> None:
        """Ask ``run`` to return (thread- and signal-safe)."""
        self.stop_event.set()
        if self._watcher is not None:
            self._watcher.wake.set()


def _verdict(rejection: Rejection) -> Rejection:
    """``rejection`` without its traceback and context, to be kept as a verdict (the
    pending cut, the step's outcome): its frames hold the manifest bytes and, through
    ``_safe_step``'s frame, the outcome that holds it: a cycle that only the cyclic
    garbage collector frees, 32 MiB at a time."""
    rejection.__context__ = None
    return rejection.with_traceback(None)


def _file_stamp(path: Path) -> tuple[int, int, int, int]:
    """What changes when a file is rewritten or replaced."""
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0, 0)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@contextmanager
def serving(config: Config, clock: Clock = utc_now) -> Iterator[tuple[Agent, Server]]:
    """The daemon's setting, shared by ``run`` and ``demo``: holds the root's lock,
    builds the agent and serves its web face until the block ends.

    Raises ``LockError`` if another agent holds the root, ``ConfigError``.
    """
    config.root.mkdir(parents=True, exist_ok=True)
    with LockFile(config.layout.lock_file):
        agent = Agent(config, clock)
        server = make_server(config, build_app(config, agent.snapshot, agent.metrics))
        server.start()
        agent.journal.write("server-listening", address=server.address)
        try:
            yield agent, server
        finally:
            server.stop()
