"""The compressed night: cuts made by ``prep-agent simulate``, placed one per
period into the folder ``distribute --watch`` follows, faults injected on
schedule, viewers and the collector followed, and at the end the records
gathered into the rehearsal report (``report.py``).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prep_agent.core.errors import Error
from prep_agent.rehearsal import faults as schedule
from prep_agent.rehearsal import pair as ha
from prep_agent.rehearsal.browser import Browser, Frame
from prep_agent.rehearsal.browser import unavailable as browser_unavailable
from prep_agent.rehearsal.inject import Injection, api_rows, published, standing
from prep_agent.rehearsal.load import Load
from prep_agent.rehearsal.netns import available as netns_unavailable
from prep_agent.rehearsal.report import FRAME_POLL
from prep_agent.rehearsal.stand import COMMAND, Proc, Stand, build, is_root, run, wait
from prep_agent.rehearsal.viewer import Viewer

NAMES = ("a", "b", "c")
"""The standalone difusores of the rehearsal (in namespace mode the HA pair ``h`` too,
its origins ``h1`` and ``h2``: ``pair.py``)."""
PERIOD_SECONDS = 600
"""The simulated cuts' ``period_seconds`` (``prep-agent simulate``'s)."""
STALE_PERIODS = 3
"""The agents' ``stale_periods`` (the default)."""
NOTICE_AFTER = 4
"""Compressed periods without a new cut after which the interruption notice is due:
each cut is signed with a cut time ``STALE_PERIODS`` x ``PERIOD_SECONDS`` -
``NOTICE_AFTER`` x ``--period`` seconds old."""


LAST_LOOK_SECONDS = 8.0
"""At most how long the viewers keep looking, once every difusor published the final
cut, until each saw it: through the pair's Varnish a cut shows after the origins'
purge delay (1.5 s, ``web/purge.py``), or at worst once a pointer's max-age (5 s)
ran out."""


def age(period: float) -> float:
    """How old (seconds) each simulated cut's cut time is when it is signed."""
    return STALE_PERIODS * PERIOD_SECONDS - NOTICE_AFTER * period


@dataclass(frozen=True)
class Options:
    """What ``prep-agent rehearse`` was asked for."""

    out: Path
    cuts: int = 8
    period: float = 2.0
    faults: Path | None = None
    browser: bool = True
    mode: str = "auto"
    """``loopback``, ``netns`` (root) or ``auto`` (netns when root)."""
    readers: int = 25
    """Simulated frames polling each difusor (``load.py``); 0: no load."""

    def netns(self) -> bool:
        """Whether the difusores run in network namespaces.

        Raises Error when ``netns`` was asked for and cannot be had.
        """
        why = netns_unavailable()
        if self.mode == "netns" and why:
            raise Error(f"--mode netns: {why}")
        return self.mode == "netns" or (self.mode == "auto" and why is None)


def simulate(stand: Stand, cuts: int, period: float) -> Proc:
    """Start ``prep-agent simulate``: a signed cut into the watched folder every ``period``."""
    scratch = stand.out / "institute" / "buzon-simulado"
    scratch.mkdir(parents=True)
    argv = [*COMMAND, "simulate", "--key", str(stand.key), "--out", str(stand.watch)]
    argv += ["--inbox", str(scratch), "--interval", str(period), "--cuts", str(cuts), "--final"]
    argv += ["--age", str(age(period))]
    proc = Proc("simulate", argv, stand.out / "institute" / "simulate.log")
    stand.procs.append(proc)
    proc.start()
    return proc


def appeared(stand: Stand, k: int) -> float | None:
    """When cut ``k``'s signature was written into the watched folder (None: not yet)."""
    try:
        return (stand.watch / f"{k:06d}" / "prep-manifest.json.sig").stat().st_mtime
    except FileNotFoundError:
        return None


def wait_cut(stand: Stand, k: int, timeout: float, institute: Proc) -> float:
    """When cut ``k`` appeared in the watched folder, once it has.

    Raises Error when it does not within ``timeout`` or the simulation exits first.
    """
    wait(lambda: appeared(stand, k), timeout, f"cut {k}", institute)
    return appeared(stand, k) or time.time()


class Board:
    """The collector's flags over time: one sample whenever something changes."""

    def __init__(self, stand: Stand) -> None:
        self.stand = stand
        self.timeline: list[dict[str, Any]] = []
        self._last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self, max_seconds: float) -> None:
        self._max = max_seconds
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        deadline = time.monotonic() + self._max
        while not self._stop.wait(0.5) and time.monotonic() < deadline:
            rows, listed = api_rows(self.stand), standing(self.stand)
            if not rows or listed is None:
                continue
            now = {
                sid: {"state": r.get("state"), "unlink": bool(r.get("unlink")),
                      "copy": r.get("copy"), "listed": sid in listed}
                for sid, r in rows.items()
            }  # fmt: skip
            if now != self._last:
                self.timeline.append({"at": time.time(), "difusores": now})
                self._last = now


def deliveries(stand: Stand) -> dict[tuple[str, int], float]:
    """(difusor, sequence) → when ``distribute`` finished delivering it."""
    db = stand.out / "institute" / "collector.sqlite"
    if not db.exists():
        return {}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        rows = conn.execute(
            "SELECT difusor, sequence, MIN(ended) FROM delivery_attempt "
            "WHERE result = 'delivered' GROUP BY difusor, sequence"
        ).fetchall()
    return {(str(d), int(s)): float(t) for d, s, t in rows}


def memorias(stand: Stand, start: float, end: float) -> dict[str, str]:
    """Each difusor's memoria técnica by ``prep-agent report`` from its own journal.

    The embedded web server keeps no access log, so the traffic part is empty.
    Returns difusor → folder or the error line.
    """
    found = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(start - 60))
    end_stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(end + 60))
    for d in stand.difusores:
        log = d.home / "access.log"
        log.touch()
        folder = stand.out / "memorias" / d.service_id
        journal = d.home / d.journal.name
        args = [*COMMAND, "report", "--access-log", str(log), "--journal", str(journal),
                "--from", stamp, "--to", end_stamp, "--baseline-from", stamp,
                "--baseline-to", end_stamp, "--out", str(folder), "--jobs", "1",
                "--period", str(max(1, round(stand.period)))]  # fmt: skip
        try:
            run(args, f"memoria técnica of {d.service_id}", timeout=120)
            found[d.service_id] = str(folder.relative_to(stand.out))
        except Error as exc:
            found[d.service_id] = f"error: {exc}"
    return found


def rehearse(options: Options) -> dict[str, Any]:
    """Run the night; return the records the report is made of.

    Raises Error when the stand cannot be built.
    """
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise Error(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    plan = schedule.load(options.faults, NAMES, options.cuts)
    tmpfs = {f.difusor for f in plan if f.kind == "disk-full" and f.difusor} if is_root() else set()
    started = time.time()
    quiet = sorted({f.difusor for f in plan if f.kind == "notice-off" and f.difusor})
    netns = options.netns()
    why_no_pair = "the HA pair runs only in network namespaces (root)"
    if netns and ha.missing():
        why_no_pair = f"the HA pair needs {', '.join(ha.missing())}"
    lag = ha.behind_lag(options.period, PERIOD_SECONDS, age(options.period))
    with_pair = netns and not ha.missing()
    stand = build(out, options.period, NAMES, sorted(tmpfs), quiet, netns,
                  lag if with_pair else None)  # fmt: skip
    stand.pair_unavailable = why_no_pair
    try:
        horizon = options.cuts * options.period + 120 + 20 * len(plan)
        viewers = [Viewer(d.service_id, d.url, stand.allowed_signers) for d in stand.difusores]
        if stand.pair is not None:  # the pair, as readers see it: through the floating address
            viewers.append(Viewer(ha.NAME, stand.pair.url, stand.allowed_signers))
        for v in viewers:
            v.start(horizon)
        loads = [
            Load(v.service_id, v.url, options.readers, FRAME_POLL)
            for v in viewers
            if options.readers and v.service_id not in ha.ORIGINS
        ]  # readers' URLs
        board = Board(stand)
        board.start(horizon)
        browser: Browser | None = None
        if options.browser and browser_unavailable() is None:
            frames = [Frame(v.service_id, v.url) for v in viewers]
            browser = Browser(out / "navegador", frames)
            browser.start(stand.portal_port, horizon)
            browser.ready.wait(60)  # the night starts once the portal is on screen
        for load in loads:  # the simulated frames too (not competing with Chromium's start)
            load.start(horizon)
        placed: dict[int, float] = {}

        def shown(sid: str, since: float) -> float | None:
            """When every viewer of ``sid`` showed the notice after ``since``."""
            times = [next(v for v in viewers if v.service_id == sid).notice_shown(since)]
            if browser is not None and not browser.error:
                frame = next(f for f in browser.frames if f.service_id == sid)
                times.append(min((t for t in frame.stale_shown.values() if t >= since),
                                 default=None))  # fmt: skip
            return None if None in times else max(t for t in times if t is not None)

        def missed(sid: str, since: float) -> float | None:
            """When a viewer of ``sid`` first found a due notice missing after ``since``."""
            seen = [f.at for v in viewers if v.service_id == sid for f in list(v.findings)
                    if f.kind == "notice" and f.at >= since]  # fmt: skip
            return min(seen) if seen else None

        stop = threading.Event()
        injections: list[Injection] = []
        busy: set[str] = set()
        institute = simulate(stand, options.cuts, options.period)
        for k in range(1, options.cuts + 1):
            placed[k] = wait_cut(stand, k, 10 * options.period + 30, institute)
            if k == 1 and stand.pair is not None:
                ha.wait_ready(stand.pair, 10 * options.period + 30)
            for fault in (f for f in plan if f.at_cut == k):
                injection = Injection(fault, stand, placed, stop, busy, shown, missed)
                injection.start()
                injections.append(injection)
        deadline = time.monotonic() + 20 * len(plan) + 10 * options.period + 60
        for injection in injections:
            injection.join(max(1.0, deadline - time.monotonic()))
        final = options.cuts
        for d in stand.difusores:
            until_final = time.monotonic() + 6 * options.period + 30
            while final not in published(d) and time.monotonic() < until_final:
                time.sleep(0.2)
        time.sleep(min(3.0, options.period))  # the viewers' last look
        looking = time.monotonic() + LAST_LOOK_SECONDS  # the pair's shows it later
        while any(final not in v.first_seen for v in viewers) and time.monotonic() < looking:
            time.sleep(0.2)
        stop.set()
        for v in viewers:
            v.stop()
        for load in loads:
            load.stop()
        board.stop()
        if browser is not None:
            browser.stop()
        ended = time.time()
        journals = {d.service_id: published(d) for d in stand.difusores}
        sent = deliveries(stand)
        if stand.pair is not None:  # the pair published (was sent) a cut once an origin did
            names = [d.service_id for d in stand.pair.origins]
            journals[ha.NAME] = {}
            for sid in names:
                for k, at in journals[sid].items():
                    journals[ha.NAME][k] = min(at, journals[ha.NAME].get(k, at))
            for (sid, k), at in list(sent.items()):
                if sid in names:
                    sent[(ha.NAME, k)] = min(at, sent.get((ha.NAME, k), at))
        records: dict[str, Any] = {
            "options": {
                "cuts": options.cuts,
                "period": options.period,
                "faults": str(options.faults) if options.faults else "default",
                "mode": stand.mode,
                "namespaces": [name for net in stand.networks for name in net.names],
                "root": is_root(),
                "period_seconds": PERIOD_SECONDS,
                "cut_age_seconds": age(options.period),
                "notice_after_periods": NOTICE_AFTER,
                "readers": options.readers,
            },  # fmt: skip
            "started": started,
            "ended": ended,
            "placed": placed,
            "difusores": [
                {
                    "service_id": d.service_id,
                    "url": d.url,
                    "tmpfs": d.tmpfs,
                    "kind": "origin" if d.service_id in ha.ORIGINS else "standalone",
                }
                for d in stand.difusores
            ]
            + (
                [
                    {
                        "service_id": ha.NAME,
                        "url": stand.pair.url,
                        "tmpfs": False,
                        "kind": "ha-pair",
                        "origins": list(ha.ORIGINS),
                        "balancers": [b.name for b in stand.pair.balancers],
                    }
                ]
                if stand.pair is not None
                else []
            ),
            "pair": None
            if stand.pair is None
            else {
                "vip": stand.pair.vip,
                "ready_at": stand.pair.ready_at,
                "lag": lag,
                "origins": list(ha.ORIGINS),
                "balancers": [b.name for b in stand.pair.balancers],
            },
            "pair_unavailable": None if stand.pair is not None else why_no_pair,
            "journals": journals,
            "deliveries": sent,
            "viewers": {v.service_id: v for v in viewers},
            "load": {load.service_id: load for load in loads},
            "browser": browser,
            "browser_unavailable": None
            if browser is not None
            else ("not asked for" if not options.browser else browser_unavailable()),
            "faults": [i.record for i in injections],
            "timeline": board.timeline,
        }
        for d in stand.difusores:
            if d.agent is not None:
                d.agent.stop()
            shutil.copyfile(d.journal, d.home / d.journal.name)  # the tmpfs goes away
    finally:
        stand.close()
    records["memorias"] = memorias(stand, started, records["ended"])
    (out / "plan.json").write_text(json.dumps([f.__dict__ for f in plan]), encoding="utf-8")
    return records
