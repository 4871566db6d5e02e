"""``prep-agent distribute``: one cut folder, or ``--watch`` a folder of cuts.

Exit codes: 0 every enabled target holds the cut; 2 configuration error;
3 the local check refused the cut (nothing was sent); 5 some target does not
hold it (one line per failed target on stderr).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from prep_agent.core.errors import EXIT_OK, EXIT_UNDELIVERED, ConfigError, Error, Rejection
from prep_agent.core.manifest import SIGNATURE_NAME
from prep_agent.core.verify import Policy
from prep_agent.institute.collector.config import CollectorConfig
from prep_agent.institute.collector.deliveries import (
    DELIVERED,
    FAILED,
    DeliveryLog,
    DistributedCut,
)
from prep_agent.institute.collector.store import CollectorDatabase
from prep_agent.institute.distribution.local import LocalCut, check_cut, load_signers, sign_here
from prep_agent.institute.distribution.scheduler import Distributor, Event
from prep_agent.institute.distribution.snapshot import Snapshots
from prep_agent.institute.distribution.transport import Link, make_link

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.25
"""Seconds between two scans of the watched folder."""
STOP_POLL = 0.25
"""Seconds between two looks at the stop signal while a one-shot run waits."""


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    cut: Path | None = None
    watch: Path | None = None
    keys: tuple[Path, ...] = ()
    agent_keys: tuple[Path, ...] = ()
    dry_run: bool = False
    confirm: bool = True


class Progress:
    """What the command shows while it delivers.

    On a terminal, one line per cut redrawn in place: targets holding it out of
    all, how many are failing, the slowest delivery so far; a failure or a
    supersession gets a line of its own above it. Otherwise (systemd, a pipe),
    one plain line per event.
    """

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self._lock = threading.Lock()
        self._done: dict[int, set[str]] = {}
        self._failing: dict[int, set[str]] = {}
        self._slowest: dict[int, tuple[float, str]] = {}
        self._shown: int | None = None

    def __call__(self, event: Event) -> None:
        """Show one event."""
        with self._lock:
            if not self.tty:
                self._line(event)
                return
            if event.kind in ("published", "unconfirmed"):
                return
            if self._shown is not None and event.sequence != self._shown:
                print(file=self.stream)  # the previous cut's line stays as it ended
            self._shown = event.sequence
            if event.kind == DELIVERED:
                self._done.setdefault(event.sequence, set()).add(event.service_id)
                slowest = self._slowest.get(event.sequence)
                if slowest is None or event.seconds > slowest[0]:
                    self._slowest[event.sequence] = (event.seconds, event.service_id)
            else:
                if event.kind == FAILED:
                    self._failing.setdefault(event.sequence, set()).add(event.service_id)
                print("\r\x1b[K", end="", file=self.stream)
                self._line(event)
            self._draw(event.sequence)

    def _draw(self, sequence: int) -> None:
        done = self._done.get(sequence, set())
        text = f"cut {sequence}: {len(done)}/{self.total} targets"
        failing = self._failing.get(sequence, set()) - done
        if failing:
            text += f", {len(failing)} failing"
        if sequence in self._slowest:
            seconds, sid = self._slowest[sequence]
            text += f", slowest {sid} {seconds:.1f} s"
        print(f"\r{text}\x1b[K", end="", file=self.stream, flush=True)

    def _line(self, event: Event) -> None:
        tail = f": {event.detail}" if event.detail else ""
        if event.kind == DELIVERED:
            tail = f": {event.files} files, {event.bytes} bytes"
        print(
            f"{event.kind} cut {event.sequence} {event.service_id} {event.seconds:.2f} s{tail}",
            file=self.stream,
            flush=True,
        )


def _policy(config: CollectorConfig) -> Policy:
    settings = config.distribute
    if settings.election is None:
        raise ConfigError("[distribute] election is required")
    signers = load_signers(settings.signers)
    return Policy(settings.election, tuple(signers), settings.threshold)


def _state(config: CollectorConfig) -> Path:
    return config.distribute.state or config.database.parent / "distribute"


def _snapshots(config: CollectorConfig, options: Options) -> Snapshots | None:
    """Where verified cuts are kept to be sent (none for a dry run)."""
    return None if options.dry_run else Snapshots(_state(config) / "cuts")


def _prune(snapshots: Snapshots | None, cut: LocalCut, distributor: Distributor) -> None:
    """Keep the bytes of ``cut`` and of every cut a target still wants; drop the rest."""
    if snapshots is not None:
        wanted, views = cut.hashes(), {cut.view_name}
        for other in distributor.in_use():
            wanted |= other.hashes()
            views.add(other.view_name)
        snapshots.prune(wanted, views)


def _links(config: CollectorConfig) -> tuple[dict[str, Link], dict[str, str | None]]:
    """Every enabled difusor with an sftp target: its link and status URL."""
    state = _state(config)
    links: dict[str, Link] = {}
    urls: dict[str, str | None] = {}
    for entry in config.difusores:
        if entry.enabled and entry.sftp is not None:
            links[entry.service_id] = make_link(entry, state, config.distribute.connect_timeout)
            urls[entry.service_id] = entry.status_url
    return links, urls


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _accept(cut: LocalCut, records: DeliveryLog, store: CollectorDatabase) -> None:
    """Remember a checked cut: the sequence history, and the dashboard's latest cut."""
    distributed = DistributedCut(
        cut.sequence, cut.manifest_sha256, cut.manifest.cut_time_text, cut.ready_at
    )
    records.record_distributed(distributed)
    store.record_cut(cut.manifest, _now())


def dry_run(cut: LocalCut, links: dict[str, Link], records: DeliveryLog, out: TextIO) -> None:
    """Print what would be sent where, without connecting anywhere."""
    for sid, link in sorted(links.items()):
        acked = records.target(sid)
        if acked.acked_sequence is not None and acked.acked_sequence >= cut.sequence:
            print(f"{sid} {link.target}: holds cut {acked.acked_sequence}, nothing", file=out)
            continue
        send = [p for p, sha in cut.files.items() if acked.acked_files.get(p) != sha]
        size = sum(cut.sizes[p] for p in send)
        print(
            f"{sid} {link.target}: {len(send)} of {len(cut.files)} files, {size} bytes, "
            "then the manifest and the signature",
            file=out,
        )


def distribute_one(
    config: CollectorConfig,
    options: Options,
    out: TextIO,
    err: TextIO,
    stop: threading.Event | None = None,
) -> int:
    """Check and deliver one cut folder to every enabled target; return the exit code.

    ``stop`` (SIGINT, SIGTERM) ends the wait early: running uploads are
    stopped and the targets not holding the cut are reported as usual.
    Raises ``Rejection`` (nothing sent) or ``Error``.
    """
    assert options.cut is not None
    policy = _policy(config)
    links, urls = _links(config)
    if options.keys or options.agent_keys:
        sign_here(options.cut, options.keys, options.agent_keys)
    records = DeliveryLog(config.database)
    store = CollectorDatabase(config.database, config.history_rows)
    snapshots = _snapshots(config, options)
    try:
        if snapshots is not None:
            snapshots.open()
        last = records.last_distributed()
        cut = check_cut(options.cut, policy, last, _now(), time.time(), snapshots)
        if options.dry_run:
            dry_run(cut, links, records, out)
            return EXIT_OK
        _accept(cut, records, store)
        distributor = Distributor(
            links, urls, config.distribute, records, Progress(len(links), out), options.confirm
        )
        try:
            distributor.offer(cut)
            _prune(snapshots, cut, distributor)
            budget = config.distribute.retry_for + config.distribute.transfer_timeout + 30
            deadline = time.monotonic() + budget
            while not distributor.wait_idle(min(STOP_POLL, max(0.0, deadline - time.monotonic()))):
                if (stop is not None and stop.is_set()) or time.monotonic() >= deadline:
                    break
        finally:
            stopped = stop is not None and stop.is_set()
            wait = config.distribute.confirm_timeout if options.confirm and not stopped else 0.0
            distributor.close(wait_confirmations=wait)
        outcomes = distributor.outcomes(cut.sequence)  # after close: stopped uploads say so
    finally:
        if snapshots is not None:
            snapshots.close()
        records.close()
        store.close()
    if out.isatty():
        print(file=out)
    failed = [o for o in outcomes if not o.held]
    for outcome in failed:
        reason = outcome.error or "not delivered"
        print(f"prep-agent: {outcome.service_id}: cut {cut.sequence}: {reason}", file=err)
    held = len(outcomes) - len(failed)
    print(f"cut {cut.sequence}: {held}/{len(outcomes)} targets hold it", file=out)
    return EXIT_UNDELIVERED if failed else EXIT_OK


class Watcher:
    """Finds new cut folders (subfolders with a signature) in the watched folder."""

    def __init__(
        self,
        folder: Path,
        policy: Policy,
        records: DeliveryLog,
        snapshots: Snapshots | None = None,
    ) -> None:
        self.folder = folder
        self.policy = policy
        self.records = records
        self.snapshots = snapshots
        self._seen: dict[str, tuple[int, int]] = {}

    def newest(self) -> LocalCut | None:
        """The newest cut not seen before that passes the local check, or None.

        Only that one is kept in a snapshot: with several new folders in one
        scan (a first start), the others are checked without copying them.
        """
        try:
            names = sorted(os.listdir(self.folder), reverse=True)
        except OSError as exc:
            raise Error(f"cannot read {self.folder}: {exc.strerror}") from None
        new: list[Path] = []
        for name in names:
            sig = self.folder / name / SIGNATURE_NAME
            try:
                st = sig.stat()
            except OSError:
                continue
            stamp = (st.st_ino, st.st_mtime_ns)
            if self._seen.get(name) != stamp:
                self._seen[name] = stamp
                new.append(sig.parent)
        keep = self.snapshots if len(new) == 1 else None
        found = [c for c in (self._check(folder, keep) for folder in new) if c is not None]
        fresh = [c for c in found if not self._replay(c)]
        best = max(fresh, key=lambda c: c.sequence) if fresh else None
        if best is not None and keep is None and self.snapshots is not None:
            kept = self._check(best.folder, self.snapshots)
            return None if kept is None else replace(kept, ready_at=best.ready_at)
        return best

    def _check(self, folder: Path, snapshots: Snapshots | None) -> LocalCut | None:
        """The checked cut of ``folder``, or None (refusal logged)."""
        try:
            last = self.records.last_distributed()
            return check_cut(folder, self.policy, last, _now(), time.time(), snapshots)
        except Rejection as exc:
            log.warning("cut folder %s refused, not sent: %s", folder.name, exc)
        except Error as exc:
            log.warning("cut folder %s: %s", folder.name, exc)
        return None

    def _replay(self, cut: LocalCut) -> bool:
        last = self.records.last_distributed()
        return last is not None and last.sequence >= cut.sequence


def watch(config: CollectorConfig, options: Options, stop: threading.Event, out: TextIO) -> int:
    """Distribute each new cut folder of ``options.watch`` until ``stop`` is set.

    Raises ``Error``.
    """
    assert options.watch is not None
    policy = _policy(config)
    links, urls = _links(config)
    records = DeliveryLog(config.database)
    store = CollectorDatabase(config.database, config.history_rows)
    snapshots = _snapshots(config, options)
    watcher = Watcher(options.watch, policy, records, snapshots)
    distributor = Distributor(
        links, urls, config.distribute, records, Progress(len(links), out), options.confirm
    )
    print(f"watching {options.watch} for cuts to {len(links)} targets", file=out, flush=True)
    try:
        if snapshots is not None:
            snapshots.open()
        while not stop.is_set():
            cut = watcher.newest()
            if cut is not None and options.dry_run:
                dry_run(cut, links, records, out)
            elif cut is not None:
                _accept(cut, records, store)
                log.info("distributing cut %d from %s", cut.sequence, cut.folder)
                distributor.offer(cut)
                _prune(snapshots, cut, distributor)
            stop.wait(WATCH_INTERVAL)
    finally:
        distributor.close()
        if snapshots is not None:
            snapshots.close()
        records.close()
        store.close()
    return EXIT_OK


def main(config: CollectorConfig, options: Options, stop: threading.Event) -> int:
    """Run ``distribute`` as the options say; return its exit code. Raises ``Error``."""
    if options.watch is not None:
        return watch(config, options, stop, sys.stdout)
    return distribute_one(config, options, sys.stdout, sys.stderr, stop)


def key_paths(values: Sequence[str] | None) -> tuple[Path, ...]:
    """Command-line key files as paths."""
    return tuple(Path(v) for v in values or ())
