"""Benchmark of ``prep-agent report`` against GoAccess on the same generated log.

Method: a seeded 10-million-line combined log of a prep-agent site (tests/reportkit.py:
a few thousand IPs, browsers and bots, the frame, ``/status.json`` polled every 15 s by
every open page, ``/cortes/<release>/…``, ``/static/…``; 4 days with the election-night
peak) is generated once and cached under /var/tmp. Then, in the same run, on the same
file, with a warm page cache (one ``cat`` first):

- ours: the whole report (parse, count, journal-less summary, charts, HTML, CSVs, JSON)
  as a separate process, ``--jobs`` workers (default: all CPUs);
- GoAccess: ``goaccess --log-format=COMBINED -o report.json`` (every panel, its default).

Reported: wall time, lines/s (lines / wall time), peak RSS: of the process tree (sum
of RSS over the process and its workers, polled every 0.1 s) and the largest single
process (``ru_maxrss`` from ``wait4``). Targets (issue 6): ours ≥ 5× GoAccess's lines/s
and the 10M-line report in ≤ 60 s.

    .venv/bin/python -m benchmarks.report                 # 10M lines, appends RESULTS.md
    .venv/bin/python -m benchmarks.report --lines 1000000 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psutil

from tests import reportkit

PROJECT = Path(__file__).resolve().parent.parent

OURS = """
import argparse, sys
from prep_agent.report import generate as report
p = argparse.ArgumentParser()
report.add_arguments(p)
sys.exit(report.cmd_report(p.parse_args(sys.argv[1:])))
"""


@dataclass(frozen=True)
class Run:
    """One measured process."""

    name: str
    seconds: float
    tree_rss_mib: float
    max_rss_mib: float
    returncode: int


def measure(name: str, argv: list[str]) -> Run:
    """Run ``argv`` to completion, polling its process tree's RSS."""
    # stderr to a file: GoAccess writes progress there and would block on a full pipe.
    with tempfile.TemporaryFile() as err_file:
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err_file)
        peak = 0
        ps = psutil.Process(proc.pid)
        while True:
            try:
                tree = [ps, *ps.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
            except psutil.Error:
                pass
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            time.sleep(0.2)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err_file.seek(0)
            print(err_file.read()[-2000:].decode("utf-8", "replace"), file=sys.stderr)
    return Run(name, seconds, peak / 2**20, usage.ru_maxrss / 1024, proc.returncode)


def log_file(lines: int, seed: int) -> Path:
    """The cached generated log (generated on first use)."""
    path = Path(f"/var/tmp/prep-report-bench-{lines}-{seed}.log")
    if not path.exists():
        t = time.monotonic()
        tmp = path.with_suffix(".part")
        n = reportkit.generate(tmp, lines, seed=seed)
        tmp.replace(path)
        print(f"generated {n:,} lines in {time.monotonic() - t:.1f} s: {path}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000_000)
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    path = log_file(args.lines, args.seed)
    with open(path, "rb") as fh:
        lines = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))
    size = path.stat().st_size
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    with tempfile.TemporaryDirectory(prefix="prep-report-bench-") as tmp:
        ours_argv = [sys.executable, "-c", OURS, "--access-log", str(path)]
        ours_argv += ["--from", "2021-06-06T00:00:00-05:00", "--to", "2021-06-08T00:00:00-05:00"]
        ours_argv += ["--baseline-from", "2021-06-04T00:00:00-05:00"]
        ours_argv += ["--baseline-to", "2021-06-06T00:00:00-05:00", "--out", f"{tmp}/ours"]
        ours_argv += ["--no-progress"] + (["--jobs", str(args.jobs)] if args.jobs else [])
        goaccess_argv = [reportkit.GOACCESS, "--log-format=COMBINED", "--no-global-config"]
        goaccess_argv += ["-o", f"{tmp}/goaccess.json", str(path)]
        ours = measure("prep-agent report", ours_argv)
        theirs = measure("goaccess 1.7 (-o json)", goaccess_argv)
    rows = []
    for r in (ours, theirs):
        rows.append(
            f"| {r.name} | {r.seconds:.1f} | {lines / r.seconds:,.0f} | "
            f"{r.tree_rss_mib:.0f} | {r.max_rss_mib:.0f} | {r.returncode} |"
        )
    speedup = theirs.seconds / ours.seconds
    verdict_speed = "PASS" if speedup >= 5 else "FAIL"
    verdict_time = "PASS" if ours.seconds <= 60 else "FAIL"
    shown_ours = " ".join(shlex.quote(a) for a in ours_argv[3:]).replace(tmp, "TMP")
    text = "\n".join(
        [
            "",
            "# Report benchmark (`benchmarks/report.py`)",
            "",
            f"Command: `.venv/bin/python -m benchmarks.report --lines {args.lines}`",
            "",
            f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}),"
            f" load average before the run {os.getloadavg()[0]:.2f}; Python"
            f" {platform.python_version()}",
            f"- Input: {path} — {lines:,} lines, {size / 2**20:,.0f} MiB, seed {args.seed},"
            " page cache warm",
            f"- Ours: `prep-agent report {shown_ours}` (whole report, no PDF)",
            f"- GoAccess: `{' '.join(goaccess_argv).replace(tmp, 'TMP')}`",
            "",
            "| run | wall s | lines/s | peak RSS tree MiB | max RSS one process MiB | exit |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"- Speed-up vs GoAccess: {speedup:.2f}× (target ≥ 5×): **{verdict_speed}**",
            f"- 10M-line report time: {ours.seconds:.1f} s (target ≤ 60 s): **{verdict_time}**"
            if args.lines == 10_000_000
            else f"- Report time: {ours.seconds:.1f} s for {lines:,} lines",
            "",
        ]
    )
    print(text)
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(text)
    return 0 if ours.returncode == 0 and theirs.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
