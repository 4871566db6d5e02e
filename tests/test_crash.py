"""Crash safety of publication (prep-cut-v1 §5): ``kill -9`` at random instants.

The real daemon (``prep-agent run``) and ``prep-agent run --once`` are killed
with SIGKILL at instants drawn uniformly over a publication window measured
first from the journal. After each kill the root is audited from the outside:
``current`` must be a complete release whose files match its manifest and whose
signature ``ssh-keygen -Y verify`` accepts, and no release may be incomplete.
After a restart the interrupted cut must be published, ``status --json`` and
``state.json`` must agree with ``current`` and ``staging/`` must be empty.

The seed is printed; rerun a failure with ``PREP_CRASH_SEED=<seed>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import time
from collections import Counter, deque
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import pytest

from prep_agent import cli
from tests.crashkit import (
    Auditor,
    deliver_signature,
    deliver_unsigned,
    remove_root,
    spawn_agent,
    state_json,
)
from tests.kit import AgentDaemon, Institute, make_config, minute_ago

FILES = 250
FILE_BYTES = 48 * 1024
"""A cut of ~12 MB in 250 files: its build takes ~100 ms on a local disk."""

MIN_SWAP_WINDOW = 0.001
"""Floor of the measured time from the rename into releases/ to cut-published (the
journal has millisecond resolution)."""

BEFORE = "before build (detect/verify)"
BUILD = "build (staging)"
BUILT = "built, not yet swapped"
SWAPPED = "swapped, state not yet written"
SAVED = "state written, not yet journaled"
PRUNE = "prune"
AFTER = "after (step done)"


def _seed() -> int:
    seed = int(os.environ.get("PREP_CRASH_SEED", str(time.time_ns() % 2**32)))
    print(f"\nPREP_CRASH_SEED={seed}")
    return seed


class Tail:
    """Follows the agent's journal as it is written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.events: list[dict[str, Any]] = []
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        """Read the lines appended since the last poll."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            with contextlib.suppress(ValueError):
                new.append(json.loads(line))
        self.events.extend(new)
        return new

    def wait_for(
        self, match: Callable[[dict[str, Any]], bool], alive: Callable[[], bool], timeout: float
    ) -> dict[str, Any] | None:
        """Busy-wait (~0.2 ms) for a matching new event; None if the agent died first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.poll():
                if match(event):
                    return event
            if not alive():
                return None
            time.sleep(0.0002)
        raise AssertionError(f"no matching journal event within {timeout} s")


def _alive(proc: AgentDaemon) -> Callable[[], bool]:
    return lambda: proc.proc.poll() is None


def _time(event: dict[str, Any]) -> float:
    """Wall-clock time of a journal event (millisecond resolution)."""
    return datetime.fromisoformat(event["time"]).timestamp()


class CrashRig:
    """One agent root, an institute delivering big cuts, and the audits after kills."""

    def __init__(self, tmp: Path, inst: Institute, seed: int, **settings: Any) -> None:
        self.inst = inst
        self.config = make_config(tmp, inst, **settings)
        self.conf_path = tmp / "prep-agent.conf"
        self.root = self.config.root
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.rng = random.Random(seed)
        self.pool = random.Random(seed + 1).randbytes(FILES * FILE_BYTES // 2 + FILE_BYTES)
        self.when = minute_ago(10)
        self.sequence = 0
        self.sig_id: str | None = None
        self.auditor = Auditor(self.root, inst.allowed_signers)
        self.tail = Tail(self.config.journal_file)
        self.daemon: AgentDaemon | None = None
        self.phases: Counter[str] = Counter()
        self.kills = 0
        self.builds: deque[float] = deque(maxlen=8)

    # -- the institute -------------------------------------------------------

    def files(self, seq: int) -> dict[str, bytes]:
        """Every file of a cut is new (no reuse by hash), so all of it is copied."""
        out = {"index.html": f"<h1>Corte {seq}</h1>".encode()}
        span = len(self.pool) - FILE_BYTES
        for i in range(FILES):
            start = (seq * 7919 + i * 4099) % span
            out[f"data/d{i % 10}/f{i:03d}.bin"] = (
                b"cut=%d file=%d\n" % (seq, i) + self.pool[start : start + FILE_BYTES]
            )
        return out

    def upload_next(self) -> bytes:
        """Upload the next cut but its signature (flushed to disk); return the signature.

        The flush keeps the agent's ``syncfs`` from paying for the upload, so the
        publication window measured once stays valid.
        """
        self.tail.poll()
        self.sequence += 1
        files = self.files(self.sequence)
        doc = self.inst.manifest(files, self.sequence, self.when)
        _data, sig = deliver_unsigned(self.inst, self.config.inbox, files, doc)
        os.sync()
        self.sig_id = hashlib.sha256(sig).hexdigest()
        return sig

    # -- the agent -----------------------------------------------------------

    def start_daemon(self) -> None:
        """Start ``prep-agent run`` and wait until it watches the drop folder."""
        self.tail.poll()
        self.daemon = spawn_agent(self.conf_path, self.logs)
        started = self.tail.wait_for(
            lambda e: e["event"] == "agent-started", self.daemon_alive, timeout=30
        )
        if started is None:
            self.daemon_died("starting")

    def keep_journal(self) -> None:
        """Keep the journal beside the agent logs; the root is deleted to save disk."""
        with contextlib.suppress(OSError):
            shutil.copy(self.config.journal_file, self.logs / "journal.jsonl")

    def daemon_alive(self) -> bool:
        return self.daemon is not None and self.daemon.proc.poll() is None

    def daemon_died(self, what: str) -> None:
        assert self.daemon is not None
        pytest.fail(
            f"agent exited ({self.daemon.proc.returncode}) while {what}:\n{self.daemon.output()}"
        )

    def stop_daemon(self) -> None:
        if self.daemon is not None:
            status = self.daemon.stop(timeout=30)
            assert status == 0, self.daemon.output()
            self.daemon = None

    def kill_daemon(self) -> None:
        if self.daemon is not None:
            self.daemon.kill()
            self.daemon = None

    def mine(self, signature_id: str | None) -> bool:
        """Whether the agent's id of a signature upload names the current cut's signature.

        The id starts with the signature's SHA-256 (inode and mtime may follow).
        """
        return bool(self.sig_id and signature_id and signature_id.startswith(self.sig_id))

    def decided(self) -> bool:
        """The current cut's signature is recorded as decided in ``state.json``."""
        try:
            return self.mine(state_json(self.root).get("last_decided_signature"))
        except (OSError, ValueError):
            return False

    def wait_decided(self, what: str) -> None:
        deadline = time.monotonic() + 30
        while not self.decided():
            if not self.daemon_alive():
                self.daemon_died(what)
            assert time.monotonic() < deadline, f"timeout: {what}"
            time.sleep(0.002)

    @contextlib.contextmanager
    def publish_lock(self) -> Iterator[None]:
        """The agent's publication lock: while held, no step of the agent runs."""
        fd = os.open(self.root / "publish.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def wait_staging(self, alive: Callable[[], bool], timeout: float = 30) -> float | None:
        """Busy-wait until the agent starts building in ``staging/``; wall-clock time."""
        staging = self.root / "staging"
        deadline = time.monotonic() + timeout
        while not (staging.is_dir() and os.listdir(staging)):
            if not alive():
                return None
            assert time.monotonic() < deadline, "the agent never started a build"
            time.sleep(0.0002)
        return time.time()

    def wait_renamed(self, alive: Callable[[], bool], timeout: float = 30) -> bool:
        """Busy-wait until the built release is renamed into ``releases/``."""
        prefix = f"{self.sequence:016d}-"
        deadline = time.monotonic() + timeout
        while not any(n.startswith(prefix) for n in os.listdir(self.root / "releases")):
            if not alive():
                return False
            assert time.monotonic() < deadline, "the agent never renamed a release"
            time.sleep(0.0002)
        return True

    def calibrate(self, cuts: int) -> dict[str, float]:
        """Publish ``cuts`` cuts unharmed; median phase durations (s).

        Through the running daemon, else through ``run --once``. ``verify``:
        cut-seen to the build folder appearing in ``staging/``; ``build``: from
        there to cut-published (copy, seal, rename, swap, state); ``swap``: from the
        release appearing in ``releases/`` to cut-published (swap, state, journal:
        a few ms on a fast disk, so it is measured, not assumed); ``prune``:
        cut-published to releases-pruned.
        """
        verify, build, swap, prune = [], [], [], []
        for _ in range(cuts):
            sig = self.upload_next()
            start = len(self.tail.events)
            deliver_signature(self.config.inbox, sig)
            once = None if self.daemon else spawn_agent(self.conf_path, self.logs, once=True)
            alive = self.daemon_alive if once is None else _alive(once)
            building = self.wait_staging(alive)
            assert building is not None, "agent died"
            assert self.wait_renamed(alive), "agent died"
            renamed = time.time()
            if once is None:
                self.wait_decided(f"publishing sequence {self.sequence}")
            else:
                assert once.proc.wait(timeout=60) == 0, once.output()
            self.check_quiet()
            events = {e["event"]: e for e in self.tail.events[start:]}
            verify.append(building - _time(events["cut-seen"]))
            build.append(_time(events["cut-published"]) - building)
            swap.append(max(MIN_SWAP_WINDOW, _time(events["cut-published"]) - renamed))
            self.builds.append(build[-1])
            if "releases-pruned" in events:
                prune.append(_time(events["releases-pruned"]) - _time(events["cut-published"]))
        window = {
            "verify": statistics.median(verify),
            "build": statistics.median(build),
            "swap": statistics.median(swap),
        }
        if prune:
            window["prune"] = statistics.median(prune)
        print("calibration (ms): " + ", ".join(f"{k} {v * 1000:.1f}" for k, v in window.items()))
        return window

    def kill(self, daemon: bool, kind: str, window: dict[str, float]) -> str:
        """One kill of the daemon or of ``run --once``, at an instant drawn for ``kind``.

        ``build``: uniform over the build (staging appears -> cut-published, recent
        median + 10%); ``swap``: uniform over the calibrated time from the rename
        into ``releases/`` to cut-published (+10%); ``verify``: uniform over
        [cut-seen, build start]; ``prune``: uniform over [cut-published,
        releases-pruned] (+20%).
        """
        trigger, delay = {
            "build": ("staging", lambda: self.rng.uniform(0, self.build_window() * 1.1)),
            "swap": ("renamed", lambda: self.rng.uniform(0, window["swap"] * 1.1)),
            "verify": ("cut-seen", lambda: self.rng.uniform(0, window["verify"])),
            "prune": ("cut-published", lambda: self.rng.uniform(0, window["prune"] * 1.2)),
        }[kind]
        if daemon:
            return self.kill_daemon_at(trigger, delay())
        return self.kill_once_run(trigger, delay())

    # -- checks ----------------------------------------------------------------

    def check_crashed(self) -> str:
        """Audit right after a kill (no agent running); return the phase it hit."""
        problems = self.auditor.audit()
        if problems:
            self.fail_with_consequence(f"incomplete releases after kill -9: {problems}")
        current = self.auditor.current()
        assert current.sequence in (self.sequence - 1, self.sequence), current
        phase = self.phase(current.sequence)
        self.phases[phase] += 1
        self.kills += 1
        return phase

    def fail_with_consequence(self, finding: str) -> None:
        """Fail, telling also what a restarted daemon then does with the next cut."""
        self.kill_daemon()
        damaged = sorted(self.auditor.audit())
        try:
            self.start_daemon()
            deliver_signature(self.config.inbox, self.upload_next())
            deadline = time.monotonic() + 15
            while not self.decided() and self.daemon_alive() and time.monotonic() < deadline:
                time.sleep(0.01)
            with self.publish_lock():  # the step (and its prune) is over
                self.tail.poll()
            errors = [e["detail"] for e in self.tail.events if e["event"] == "agent-error"]
            if self.decided():
                after = f"the next cut was decided (current: {self.auditor.current().sequence})"
            elif not self.daemon_alive():
                assert self.daemon is not None
                after = f"the restarted daemon exited ({self.daemon.proc.returncode})"
            else:
                after = "the restarted daemon did not decide the next cut within 15 s"
            left = [n for n in damaged if (self.auditor.releases / n).exists()]
            after += f"; agent-error events: {errors}; still in releases/: {left}"
        except (AssertionError, pytest.fail.Exception) as exc:
            after = f"restart failed: {str(exc).strip().splitlines()[-1:]}"
        pytest.fail(f"{finding}\nThen: {after}\nphases so far: {dict(self.phases)}")

    def phase(self, current_seq: int) -> str:
        """Where the kill landed, from what it left on disk and in the journal."""
        seq = self.sequence
        self.tail.poll()
        mine = [e for e in self.tail.events if e.get("sequence") == seq]
        if current_seq == seq:
            state = state_json(self.root)
            if not self.mine(state.get("last_decided_signature")):
                return SWAPPED
            if not any(e["event"] == "cut-published" for e in mine):
                return SAVED
            # Pruning renames a release to .trash-<name>, then deletes it.
            trash = [n for n in os.listdir(self.root / "releases") if n.startswith(".trash-")]
            if trash or len(self.auditor.verified) > self.config.keep_releases:
                return PRUNE
            return AFTER
        if any(s.sequence == seq for s in self.auditor.verified.values()):
            return BUILT
        if os.listdir(self.root / "staging"):
            return BUILD
        return BEFORE

    def check_quiet(self) -> None:
        """Audit with the agent idle after a restart: the cut is published, all agree."""
        with self.publish_lock():
            self.tail.poll()
            problems = self.auditor.audit()
            assert not problems, f"incomplete releases after restart: {problems}"
            current = self.auditor.current()
            assert current.sequence == self.sequence, (
                f"current is sequence {current.sequence}: the interrupted cut "
                f"{self.sequence} was not published after the restart"
            )
            staging = os.listdir(self.root / "staging")
            assert staging == [], f"staging not emptied after restart: {staging}"
            leftovers = [n for n in os.listdir(self.root) if n.startswith(".current.")]
            assert leftovers == [], leftovers
            trash = [n for n in os.listdir(self.root / "releases") if n.startswith(".")]
            assert trash == [], f"half-deleted releases left after restart: {trash}"
            state = state_json(self.root)
            assert state["highest_sequence"] >= current.sequence, state
            assert state["highest_manifest_sha256"] == current.manifest_sha256, state
            assert self.mine(state["last_decided_signature"]), state
            assert state["last_rejection"] is None, state
            assert os.listdir(self.root / "quarantine") == []
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert cli.main(["status", "--json", "--config", str(self.conf_path)]) == 0
            status = json.loads(out.getvalue())
            assert status["sequence"] == current.sequence, status
            assert status["manifest_sha256"] == current.manifest_sha256, status
            assert status["highest_sequence"] == state["highest_sequence"], status
            assert status["current_path"] == str(self.root / "releases" / current.name)

    # -- the kills -------------------------------------------------------------

    def kill_daemon_at(self, trigger: str, delay: float) -> str:
        """Upload a cut, SIGKILL the daemon ``delay`` s after ``trigger``; restart; audit.

        ``trigger`` is ``staging`` (the build folder appears) or a journal event
        of this cut. The restarted daemon must finish the interrupted cut.
        """
        sig = self.upload_next()
        seq = self.sequence
        deliver_signature(self.config.inbox, sig)
        if not self._wait_trigger(trigger, self.daemon_alive):
            self.daemon_died(f"publishing sequence {seq}")
        time.sleep(delay)
        self.kill_daemon()
        phase = self.check_crashed()
        self.start_daemon()
        if phase in (BEFORE, BUILD):  # the restart builds the cut again: time it
            self.time_build(self.daemon_alive)
        self.wait_decided(f"finishing sequence {seq} after the restart")
        self.check_quiet()
        return phase

    def time_build(self, alive: Callable[[], bool]) -> None:
        """Measure one build (staging appears -> cut-published) for the kill window."""
        building = self.wait_staging(alive)
        if building is None:
            return
        event = self.tail.wait_for(
            lambda e: e["event"] == "cut-published" and e["sequence"] == self.sequence,
            alive,
            timeout=30,
        )
        if event is not None:
            self.builds.append(_time(event) - building)

    def plan(self, **counts: int) -> list[str]:
        """``counts`` kills of each kind, in a random order."""
        kinds = [kind for kind, n in counts.items() for _ in range(n)]
        self.rng.shuffle(kinds)
        return kinds

    def build_window(self) -> float:
        """Recent median of the build time (copy to cut-published), in seconds."""
        return statistics.median(self.builds)

    def _wait_trigger(self, trigger: str, alive: Callable[[], bool]) -> bool:
        if trigger == "staging":
            return self.wait_staging(alive) is not None
        if trigger == "renamed":
            return self.wait_renamed(alive)
        seq = self.sequence
        hit = self.tail.wait_for(
            lambda e: e["event"] == trigger
            and e.get("sequence", seq) == seq
            and self.mine(e.get("signature_sha256", self.sig_id)),
            alive,
            timeout=30,
        )
        return hit is not None

    def kill_once_run(self, trigger: str, delay: float) -> str:
        """The same with ``prep-agent run --once``; restarted with ``run --once``."""
        assert self.daemon is None
        deliver_signature(self.config.inbox, self.upload_next())
        proc = spawn_agent(self.conf_path, self.logs, once=True)
        assert self._wait_trigger(trigger, lambda: proc.proc.poll() is None), proc.output()
        time.sleep(delay)
        proc.kill()
        phase = self.check_crashed()
        restart = spawn_agent(self.conf_path, self.logs, once=True)
        assert restart.proc.wait(timeout=60) == 0, restart.output()
        out = restart.output()
        assert any(w in out for w in ("published", "replay", "idle")), out
        self.check_quiet()
        return phase


def test_kill9_during_publication(tmp_path: Path, institute: Institute) -> None:
    """52 kills over verify, build, swap and state write (prune is out: keep all).

    25 kills of the daemon, then 27 of ``run --once`` (the daemon starts in ~1 s,
    ``run --once`` in ~0.4 s); for each, the instant is drawn for a build, swap or
    verify kill (see ``CrashRig.kill``).
    """
    seed = _seed()
    began = time.monotonic()
    rig = CrashRig(tmp_path, institute, seed, keep_releases=1000)
    try:
        rig.start_daemon()
        window = rig.calibrate(3)
        for kind in rig.plan(build=15, swap=6, verify=4):
            rig.kill(True, kind, window)
        daemon_phases = Counter(rig.phases)
        rig.stop_daemon()
        rig.phases.clear()
        for kind in rig.plan(build=17, swap=6, verify=4):
            rig.kill(False, kind, window)
        print(f"daemon kills: {sum(daemon_phases.values())} {dict(daemon_phases)}")
        print(f"run --once kills: {sum(rig.phases.values())} {dict(rig.phases)}")
        print(f"recent build times (ms): {[round(b * 1000) for b in rig.builds]}")
        print(f"{rig.sequence} cuts published, {time.monotonic() - began:.1f} s")
        total = daemon_phases + rig.phases
        assert rig.kills == 52
        # The kills did land inside the publication, not only around it.
        assert total[BUILD] >= 15, total
        assert total[BUILT] + total[SWAPPED] + total[SAVED] >= 3, total
    finally:
        rig.kill_daemon()
        rig.keep_journal()
        remove_root(rig.root)


def test_kill9_during_prune(tmp_path: Path, institute: Institute) -> None:
    """12 kills of ``run --once`` while it deletes old releases (keep_releases = 2,
    keep_replaced_seconds = 0: pruning on every publication).

    No incomplete release may be left in ``releases/``, and the restarted agent
    must go on publishing.
    """
    seed = _seed() + 1
    began = time.monotonic()
    rig = CrashRig(tmp_path, institute, seed, keep_releases=2, keep_replaced_seconds=0)
    try:
        window = rig.calibrate(4)
        for kind in rig.plan(prune=12):
            rig.kill(False, kind, window)
        print(f"prune kills: {rig.kills} {dict(rig.phases)}, {time.monotonic() - began:.1f} s")
        assert rig.phases[PRUNE] >= 4, rig.phases
    finally:
        rig.kill_daemon()
        rig.keep_journal()
        remove_root(rig.root)
