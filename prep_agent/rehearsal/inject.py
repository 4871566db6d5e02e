"""Each fault of a rehearsal, injected and watched for in its own thread.

A fault's record says what was done and when (``injected_at``), what the spec
expects, and when and by whom it was seen (``detected_at``, ``detected_by``);
``window`` is when its difusor was knowingly unhealthy (its errors are then
not held against it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from prep_agent.agent.layout import Layout
from prep_agent.rehearsal import pair, skew
from prep_agent.rehearsal.faults import NOT_AVAILABLE, Fault
from prep_agent.rehearsal.stand import COMMAND, Difusor, Stand, signal_tree
from prep_agent.rehearsal.viewer import fetch

EXPECTED = {
    "kill-agent": "the agent restarts and publishes the cut (or a newer one)",
    "disk-full": (
        "the failed upload is recorded by distribute (or the agent journals an error); "
        "after space returns, the newest cut is published"
    ),
    "network-cut": (
        "the collector flags it and drops it from the good-standing list, its frame shows the "
        "interruption notice once due, then it is listed again"
    ),
    "bad-signature": "distribute refuses the cut; every difusor rejects it (signature-untrusted)",
    "replay": "distribute refuses the older cut; every difusor rejects it (rollback)",
    "tamper": "the collector's audit finds the public copy altered",
    "notice-off": "a viewer finds the interruption notice missing once one is due",
    "clock-skew": skew.EXPECTED,
    "balancer-kill": pair.EXPECTED["balancer-kill"],
    "origin-stop": pair.EXPECTED["origin-stop"],
}


RESTARTS = {"kill-agent", "clock-skew"}
"""Kinds that stop and start a difusor's agent."""


def journal(d: Difusor) -> Iterator[dict[str, Any]]:
    """The events of ``d``'s journal (unreadable lines skipped)."""
    try:
        lines = d.journal.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "time" in record:
            record["at"] = datetime.fromisoformat(str(record["time"])).timestamp()
            yield record


def published(d: Difusor, since: float = 0.0) -> dict[int, float]:
    """Sequence → time of ``d``'s ``cut-published`` events after ``since``."""
    found: dict[int, float] = {}
    for e in journal(d):
        if e["event"] == "cut-published" and e["at"] >= since:
            found.setdefault(int(e.get("sequence", -1)), e["at"])
    return found


def refused(d: Difusor, since: float) -> list[dict[str, Any]]:
    """``d``'s refusals after ``since``: ``cut-rejected``, and ``cut-waiting`` (a cut
    whose signature does not verify is held until ``settle_timeout``, §1.3, and a
    newer cut may supersede it before)."""
    kinds = ("cut-rejected", "cut-waiting")
    return [e for e in journal(d) if e["event"] in kinds and e["at"] >= since]


def api_rows(stand: Stand) -> dict[str, dict[str, Any]]:
    """The collector's rows by difusor (empty when it does not answer)."""
    code, body = fetch(stand.collector_url + "/api/difusores")
    if code != 200:
        return {}
    rows = json.loads(body).get("difusores", [])
    return {str(r.get("service_id")): r for r in rows if isinstance(r, dict)}


def standing(stand: Stand) -> set[str] | None:
    """The ids in the collector's good-standing list (None when it does not answer)."""
    code, body = fetch(stand.collector_url + "/difusores-vigentes.json")
    if code != 200:
        return None
    return {str(r.get("serviceId")) for r in json.loads(body).get("difusores", [])}


def until(probe: Callable[[], Any], seconds: float, stop: threading.Event) -> Any:
    """``probe()`` every 0.2 s until true, for at most ``seconds``; its last value."""
    deadline = time.monotonic() + seconds
    value = probe()
    while not value and time.monotonic() < deadline and not stop.is_set():
        time.sleep(0.2)
        value = probe()
    return value


@dataclass
class Injection:
    """One fault while the night runs."""

    fault: Fault
    stand: Stand
    placed: dict[int, float]
    stop: threading.Event
    busy: set[str]
    """Difusores under a fault now (shared by every injection)."""
    notice: Callable[[str, float], float | None] = lambda sid, since: None
    """When every viewer of a difusor showed the interruption notice after a time
    (None: not yet)."""
    missed: Callable[[str, float], float | None] = lambda sid, since: None
    """When a viewer of a difusor found a due notice missing after a time (None: not yet)."""
    record: dict[str, Any] = field(default_factory=dict)
    thread: threading.Thread | None = None

    @property
    def period(self) -> float:
        return self.stand.period

    def difusor(self) -> Difusor:
        return next(d for d in self.stand.difusores if d.service_id == self.fault.difusor)

    def start(self) -> None:
        """Run the fault in its own thread (reported as not available when it is)."""
        f = self.fault
        self.record = {
            "kind": f.kind,
            "difusor": f.difusor,
            "at_cut": f.at_cut,
            "injected_at": None,
            "expected": EXPECTED[f.kind],
            "detected_at": None,
            "detected_by": None,
            "detail": "",
            "status": "pending",
            "window": None,
        }
        if f.kind in NOT_AVAILABLE:
            self.record.update(status="not-available", detail=NOT_AVAILABLE[f.kind])
            return
        if f.kind == "disk-full" and not self.difusor().tmpfs:
            self.record.update(status="not-available", detail="needs root to mount a tmpfs")
            return
        if f.kind in pair.EXPECTED and self.stand.pair is None:
            self.record.update(status="not-available", detail=self.stand.pair_unavailable)
            return
        if f.kind == "clock-skew" and skew.unavailable():
            self.record.update(status="not-available", detail=skew.unavailable())
            return
        # One that restarts an agent waits for another fault on that difusor to end.
        queued = f.kind in RESTARTS and f.difusor in self.busy
        if f.difusor is not None and not queued:
            self.busy.add(f.difusor)
        self.thread = threading.Thread(target=self._run, args=(queued,), daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the fault's thread."""
        if self.thread is not None:
            self.thread.join(timeout)
            if self.thread.is_alive():
                self.record["detail"] += " (still running at the end)"

    def _run(self, queued: bool = False) -> None:
        sid = self.fault.difusor
        if queued and sid is not None:
            # Another fault holds this difusor (on a loaded machine a restart after
            # kill-agent outlasted the cuts until a clock-skew of the same agent,
            # which then stopped the agent being restarted): wait for it, bounded.
            until(lambda: sid not in self.busy, 10 * self.period + 30, self.stop)
            self.busy.add(sid)
        try:
            getattr(self, "_" + self.fault.kind.replace("-", "_"))()
        except Exception as exc:  # a fault that cannot be run is a failed rehearsal
            self.record["detail"] += f" injection failed: {exc!r}"
        if self.fault.difusor is not None:
            self.busy.discard(self.fault.difusor)
        done = self.record["detected_at"] is not None
        self.record["status"] = "detected" if done else "missed"

    def _inject(self, detail: str) -> float:
        now = time.time()
        self.record["injected_at"] = now
        self.record["detail"] = detail
        return now

    def _detected(self, at: float, by: str) -> None:
        self.record["detected_at"] = at
        self.record["detected_by"] = by

    def _healthy_current(self, sequence: int) -> list[Difusor]:
        """The difusores not under a fault that published ``sequence`` (or a newer cut),
        once all did or within three periods + 10 s (bounded: on a loaded machine one
        period was not enough, and a fault left with no difusor to reach failed)."""

        def showing() -> list[Difusor]:
            return [
                d
                for d in self.stand.difusores
                if max(published(d), default=0) >= sequence and d.service_id not in self.busy
            ]

        count = len([d for d in self.stand.difusores if d.service_id not in self.busy])
        until(lambda: len(showing()) >= count, 3 * self.period + 10, self.stop)
        return showing()

    def _kill_agent(self) -> None:
        d, k = self.difusor(), self.fault.at_cut
        placed = self.placed[k]
        sig = d.inbox / "prep-manifest.json.sig"
        arrived = until(
            lambda: sig.exists() and sig.stat().st_mtime >= placed, 3 * self.period, self.stop
        )
        assert d.agent is not None
        d.agent.kill()
        when = self._inject(
            f"SIGKILL of the agent {'after' if arrived else 'before'} cut {k} arrived"
        )
        time.sleep(self.period)
        d.start_agent()
        got = until(
            lambda: [t for s, t in published(d, when).items() if s >= k],
            4 * self.period + 20,
            self.stop,
        )
        if got:
            self._detected(min(got), "agent journal (cut-published after restart)")
        self.record["window"] = [when, time.time()]

    def _network_cut(self) -> None:
        d = self.difusor()
        assert d.sshd is not None
        if d.node is not None:
            d.set_link(False)
            when = self._inject(
                "link to the institute down (ip link set inst0 down in its namespace); readers "
                "still reach its agent on their own link"
            )
        else:
            signal_tree(d.sshd, signal.SIGSTOP)
            when = self._inject(
                "sshd and its sessions stopped (SIGSTOP): the institute's connections are "
                "accepted by the kernel and never answered; the agent keeps serving readers "
                "its last cut"
            )
        sid = d.service_id

        def flagged() -> bool:
            row = api_rows(self.stand).get(sid, {})
            return bool(row.get("unlink")) and sid not in (standing(self.stand) or {sid})

        # Held for four periods at least, and until the collector flagged it and the
        # notice (due four compressed periods after its last cut) was on every viewer.
        deadline = time.monotonic() + 8 * self.period + 20
        flagged_at: float | None = None
        shown: float | None = None
        while time.monotonic() < deadline and not self.stop.is_set():
            if flagged_at is None and flagged():
                flagged_at = time.time()
            shown = shown or self.notice(sid, when)
            held = time.time() >= when + 4 * self.period
            if flagged_at and held and (shown or self.missed(sid, when)):
                break  # (a notice found missing will not be shown: a defect)
            time.sleep(0.2)
        self.record["notice_shown_at"] = shown
        if flagged_at:
            self._detected(flagged_at, "collector (3-period flag, off the good-standing list)")
        if d.node is not None:
            d.set_link(True)
        else:
            signal_tree(d.sshd, signal.SIGCONT)
        back = until(
            lambda: sid in (standing(self.stand) or set()), 10 * self.period + 30, self.stop
        )
        self.record["relinked_at"] = time.time() if back else None
        if not back:
            self.record["detail"] += "; not listed again after recovery"
            self.record["detected_at"] = None
        if shown is None:
            self.record["detail"] += "; the interruption notice was not shown"
            self.record["detected_at"] = None
        self.record["window"] = [when, time.time()]

    def _disk_full(self) -> None:
        d = self.difusor()
        filler = d.root / "relleno"
        with open(filler, "wb") as out:
            try:
                for _ in range(4096):
                    out.write(b"\0" * (1 << 20))
                    out.flush()
            except OSError:
                pass
        when = self._inject(f"storage of {d.service_id} filled ({filler.stat().st_size} bytes)")

        def failed() -> float | None:
            import sqlite3

            db = self.stand.out / "institute" / "collector.sqlite"
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                rows = conn.execute(
                    "SELECT ended FROM delivery_attempt"
                    " WHERE difusor = ? AND result != 'delivered' AND started >= ?",
                    (d.service_id, when),
                ).fetchall()
            errors = [
                e["at"] for e in journal(d) if e["event"] == "agent-error" and e["at"] >= when
            ]
            times = [float(r[0]) for r in rows] + errors
            return min(times) if times else None

        seen = until(failed, 4 * self.period + 20, self.stop)
        if seen:
            self._detected(float(seen), "distribute (failed upload recorded) / agent journal")
        time.sleep(max(0.0, when + 2 * self.period - time.time()))
        filler.unlink()
        newest = max(self.placed)
        if d.agent is None or not d.agent.alive():
            d.start_agent()
        ok = until(
            lambda: [s for s in published(d, when) if s >= newest], 6 * self.period + 30, self.stop
        )
        if not ok:
            self.record["detail"] += f"; cut {newest} not published after space returned"
            self.record["detected_at"] = None
        self.record["window"] = [when, time.time()]

    def _deliver_directly(
        self, targets: list[Difusor], manifest: bytes, signature: bytes
    ) -> list[Difusor]:
        """Write a manifest, then its signature, into each inbox (as an intruder could);
        return the difusores written to (one that came under another fault is left out)."""
        targets = [d for d in targets if d.service_id not in self.busy]
        for d in targets:
            (d.inbox / "prep-manifest.json").write_bytes(manifest)
            part = d.inbox / ".sig.part"
            part.write_bytes(signature)
            os.replace(part, d.inbox / "prep-manifest.json.sig")
        return targets

    def _refused_by_distribute(self, folder: Path) -> str | None:
        done = subprocess.run(
            [*COMMAND, "distribute", "--config", str(self.stand.conf), "--no-confirm", str(folder)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            return None
        return " ".join(done.stderr.split())[:300] or f"exit {done.returncode}"

    def _expect_rejections(self, targets: list[Difusor], when: float, reason: str) -> None:
        left_out: set[str] = set()

        def all_rejected() -> list[float] | None:
            times = []
            for d in targets:
                # One that came under another fault meanwhile (a full disk; an agent
                # restarted with a skewed clock, which journals in its own time) is
                # left out of the expectation from then on.
                if d.service_id in self.busy or d.service_id in left_out:
                    left_out.add(d.service_id)
                    continue
                found = [e["at"] for e in refused(d, when) if e.get("reason") == reason]
                if not found:
                    return None
                times.append(min(found))
            return times or [when]  # none left: distribute's refusal is all there is

        times = until(all_rejected, 3 * self.period + 20, self.stop)
        if not times:
            self.record["detected_at"] = None
            self.record["detail"] += f"; not every difusor journaled {reason}"
        else:
            self.record["rejected_by"] = [d.service_id for d in targets
                                          if d.service_id not in left_out]  # fmt: skip
            self.record["detected_at"] = max(self.record["detected_at"] or 0, max(times))

    def _bad_signature(self) -> None:
        k = self.fault.at_cut
        source = self.stand.watch / f"{k:06d}"
        targets = self._healthy_current(k)
        folder = self.stand.out / "institute" / "corte-mal-firmado"
        shutil.copytree(source, folder)
        doc = json.loads((source / "prep-manifest.json").read_bytes())
        doc["sequence"] = k + 1
        manifest = json.dumps(doc, indent=1).encode()
        (folder / "prep-manifest.json").write_bytes(manifest)
        (folder / "prep-manifest.json.sig").unlink()
        subprocess.run(
            ["ssh-keygen", "-Y", "sign", "-q", "-n", "prep-cut", "-f", str(self.stand.rogue_key),
             str(folder / "prep-manifest.json")],
            check=True, capture_output=True, timeout=30,
        )  # fmt: skip
        signature = (folder / "prep-manifest.json.sig").read_bytes()
        when = self._inject(f"cut {k + 1} signed by an untrusted key")
        refused = self._refused_by_distribute(folder)
        if refused:
            self._detected(time.time(), f"distribute (refused: {refused}) and every difusor")
        targets = self._deliver_directly(targets, manifest, signature)
        self._expect_rejections(targets, when, "signature-untrusted")

    def _replay(self) -> None:
        k = self.fault.at_cut
        if k < 2:
            self.record["detail"] = "a replay needs an earlier cut"
            return
        targets = self._healthy_current(k)
        old = self.stand.watch / f"{k - 1:06d}"
        when = self._inject(f"cut {k - 1} uploaded again after cut {k}")
        refused = self._refused_by_distribute(old)
        if refused:
            self._detected(time.time(), f"distribute (refused: {refused}) and every difusor")
        manifest = (old / "prep-manifest.json").read_bytes()
        signature = (old / "prep-manifest.json.sig").read_bytes()
        targets = self._deliver_directly(targets, manifest, signature)
        self._expect_rejections(targets, when, "rollback")

    def _tamper(self) -> None:
        d, k = self.difusor(), self.fault.at_cut
        until(lambda: k in published(d), 3 * self.period, self.stop)
        current = Layout(d.root).current
        changed = []
        for rel in ("index.html", "css/prep.css"):
            path = current / rel
            if path.is_file():
                path.chmod(0o644)
                with open(path, "ab") as out:
                    out.write(b"\n/* alterado por el difusor */\n")
                changed.append(rel)
        self._inject(f"{', '.join(changed)} of {d.service_id}'s published copy changed on disk")
        sid = d.service_id
        altered = until(lambda: api_rows(self.stand).get(sid, {}).get("copy") == "altered",
                        6 * self.period + 30, self.stop)  # fmt: skip
        if altered:
            self._detected(time.time(), "collector audit (copia alterada)")

    def _clock_skew(self) -> None:
        skew.run(self)

    def _balancer_kill(self) -> None:
        pair.balancer_kill(self)

    def _origin_stop(self) -> None:
        pair.origin_stop(self)

    def _notice_off(self) -> None:
        d = self.difusor()
        when = self._inject(f"the agent of {d.service_id} runs with stale_periods = 1000")
        found = until(lambda: self.missed(d.service_id, when - self.period),
                      12 * self.period + 30, self.stop)  # fmt: skip
        if found:
            self._detected(float(found), "viewer (interruption notice due, not shown)")
