"""The simulated institute at work: a cut every interval, and ``prep-agent simulate``."""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from prep_agent.core import sshkeys
from prep_agent.core.errors import Error
from prep_agent.institute.delivery import deliver_local, deliver_sftp, split_target
from prep_agent.institute.sign import CutInfo, load_key, sign_folder
from prep_agent.institute.simulation.election import Simulation
from prep_agent.institute.simulation.https import PackagePublisher
from prep_agent.institute.simulation.site import build_cut

OFFSET = timezone(timedelta(hours=-6), "UTC-6")
"""Coahuila's offset, in which the institute stamps its cuts."""
KEEP_CUTS = 5
"""Cut folders :func:`run_institute` keeps in its output folder (older ones are deleted)."""

Clock = Callable[[], datetime]


def now_utc6() -> datetime:
    """The institute's clock: now, in Coahuila's offset."""
    return datetime.now(OFFSET)


def _last_sequence(outdir: Path) -> int:
    """The highest cut folder (``NNNNNN``) in ``outdir``, 0 if none."""
    numbers = [int(p.name) for p in outdir.iterdir() if re.fullmatch(r"\d{6,}", p.name)]
    return max(numbers, default=0)


def _prune(outdir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest cut folders."""
    folders = sorted(
        (p for p in outdir.iterdir() if re.fullmatch(r"\d{6,}", p.name)), key=lambda p: int(p.name)
    )
    for folder in folders[:-keep] if keep > 0 else []:
        shutil.rmtree(folder, ignore_errors=True)


def run_institute(
    sim: Simulation,
    key: sshkeys.PrivateKey,
    outdir: Path,
    deliver: Callable[[Path], None],
    interval: float,
    cuts: int,
    stop: threading.Event,
    clock: Clock = now_utc6,
    final: bool = False,
    keep: int = KEEP_CUTS,
    age: float = 0.0,
) -> None:
    """Build, sign and deliver one cut every ``interval`` seconds.

    Cut folders are ``outdir/NNNNNN``; the sequence continues after the highest
    one already there. The cut time is ``clock()`` in UTC-6 truncated to the
    minute (never before the previous cut's). Stops when ``stop`` is set or
    after ``cuts`` cuts (0: never); with ``final`` the last of them is the
    final cut. With ``age`` > 0 the cut time is ``age`` seconds before the clock,
    to the second (a compressed night: freshness comes due ``stale_periods`` x
    ``period_seconds`` - ``age`` seconds after a cut, as in a rehearsal). Raises
    what building, signing or ``deliver`` raise.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    sequence = _last_sequence(outdir)
    made = 0
    latest: datetime | None = None
    while not stop.is_set():
        sequence += 1
        made += 1
        last = cuts > 0 and made >= cuts
        # A clock stepped back must not make a cut older than the last (spec §4.4).
        now = latest = max(
            clock().astimezone(OFFSET), latest or datetime.min.replace(tzinfo=OFFSET)
        )
        cut_time = now.replace(second=0, microsecond=0)
        if age > 0:
            cut_time = (now - timedelta(seconds=age)).replace(microsecond=0)
        folder = outdir / f"{sequence:06d}"
        build_cut(sim, sequence, cut_time, folder, final=final and last)
        info = CutInfo(
            sim.election,
            sequence,
            cut_time.isoformat(),
            final=final and last,
            period_seconds=sim.period_seconds,
            signed_at=now.isoformat(timespec="seconds"),
        )
        sign_folder(folder, key, info)
        deliver(folder)
        _prune(outdir, keep)
        if last:
            return
        stop.wait(interval)


class MinuteApart:
    """The institute's clock for packages: readings at least a minute apart, as a
    package is named by its cut minute (with ``--interval`` under 60 s the stamps run
    ahead of the real clock)."""

    def __init__(self) -> None:
        self.last: datetime | None = None

    def __call__(self) -> datetime:
        now = now_utc6()
        if self.last is not None:
            now = max(now, self.last + timedelta(minutes=1))
        self.last = now
        return now


class _Deliverer:
    """The delivery of ``prep-agent simulate``: local or SFTP, reporting each cut."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.previous: Path | None = None

    def __call__(self, folder: Path) -> None:
        args = self.args
        try:
            if args.inbox:
                deliver_local(folder, Path(args.inbox))
            else:
                identity = Path(args.identity) if args.identity else None
                deliver_sftp(folder, args.sftp, identity, args.port, previous=self.previous)
        except (Error, OSError) as exc:
            self.previous = None  # upload everything next time
            print(f"institute: cut {int(folder.name)} not delivered: {exc}", file=sys.stderr)
            return
        self.previous = folder
        print(f"institute: delivered cut {int(folder.name)}", flush=True)


def main(args: argparse.Namespace) -> int:
    """``prep-agent simulate``: run the simulated institute; return the exit status.

    Raises ``Error`` (bad key, folder) for the command line to report.
    """
    serve = getattr(args, "serve_https", None)
    if sum(bool(x) for x in (args.inbox, args.sftp, serve)) != 1:
        raise Error("give exactly one of --inbox DIR, --sftp USER@HOST:DIR and --serve-https")
    if args.sftp:
        split_target(args.sftp)
    if args.interval <= 0 or args.cuts < 0:
        raise Error("--interval must be positive and --cuts at least 0")
    if getattr(args, "age", 0.0) < 0:
        raise Error("--age must be at least 0 seconds")
    if serve and getattr(args, "age", 0.0):
        raise Error("--age does not go with --serve-https (packages are named by their minute)")
    key = load_key(Path(args.key))
    sim = Simulation(seed=args.seed)
    stop = threading.Event()
    publisher = _publisher(serve, Path(args.out), key) if serve else None
    try:
        run_institute(
            sim,
            key,
            Path(args.out),
            publisher or _Deliverer(args),
            args.interval,
            args.cuts,
            stop,
            clock=MinuteApart() if publisher else now_utc6,
            final=args.final,
            age=getattr(args, "age", 0.0),
        )
        if publisher is not None and getattr(args, "keep_serving", False):
            stop.wait()
    except KeyboardInterrupt:
        print("institute: stopped", flush=True)
    finally:
        if publisher is not None:
            publisher.close()
    return 0


def _publisher(listen: str, out: Path, key: sshkeys.PrivateKey) -> PackagePublisher:
    """Start serving packages over HTTPS at ``HOST:PORT``; print what a difusor needs."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise Error(f"--serve-https {listen!r}: give HOST:PORT, e.g. 127.0.0.1:8443")
    publisher = PackagePublisher(out, key, host.strip("[]"), int(port))
    print(
        f"institute: serving PREP packages at {publisher.url} (also index.json and "
        f"latest.zip); CA {publisher.ca_file}; pin_sha256 {publisher.pin}",
        flush=True,
    )
    return publisher
