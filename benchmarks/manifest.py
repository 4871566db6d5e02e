#!/usr/bin/env python3
"""Manifest benchmark: what a signed manifest of many files costs the real agent.

Real PREP publications with acta images list 100,000+ files. A seeded
publication of ``--files`` files (default 199,999 images + index.html: the
``max_files`` limit of 200,000) is signed with the real ``ssh-keygen``.

1. Parse: in this process, ``decide`` (signature + manifest rules) and
   ``parse_manifest`` alone on the signed manifest, best of 3.
2. Retained releases: a separate ``prep-agent run`` (``keep_releases`` =
   ``--releases``, ``keep_replaced_seconds`` 0) publishes ``--releases`` + 1
   cuts, each changing 5 % of the files (the rest are hard links from the
   release before). After each publication, once the agent is idle, its
   resident memory (VmRSS) is read: growth per retained release is the slope
   between the first cut and the cut that fills ``keep_releases``.
3. Settling: the next cut lists a file that is not in the drop folder yet; for
   ``SETTLE_SECONDS`` the drop folder gets an event every 0.25 s (each one may
   wake a retry of the cut, at most 5 a second). The agent's CPU time over that
   wait is read, and its retries are counted as the bytes it read (``rchar``)
   over the manifest's size (a retry reads the manifest once); then the file is
   written and the cut publishes.

Usage, from the repository root:
  .venv/bin/python -m benchmarks.manifest [--files N] [--releases K] [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from benchmarks.publish import machine_info, proc_status, wait_cpu_quiet
from prep_agent.core.manifest import Limits, parse_manifest
from prep_agent.core.verify import Published, decide
from prep_agent.daemon import load_policy
from tests.kit import ELECTION, OFFSET, AgentDaemon, Institute, make_config, ssh_sign

MIB = 1024 * 1024
SIG = "prep-manifest.json.sig"
MANIFEST = "prep-manifest.json"
CHANGED = 0.05
"""Fraction of the files that change from one cut to the next."""
SETTLE_SECONDS = 10.0
"""How long phase 3 keeps the cut settling (one file missing)."""


@dataclass
class Publication:
    """The acta images of one election night, as the institute holds them."""

    inbox: Path
    count: int
    versions: list[int] = field(default_factory=list)

    def path(self, i: int) -> str:
        return f"actas/{i // 1000:04d}/acta-{i:07d}.jpg"

    def body(self, i: int) -> bytes:
        return f"acta {i} version {self.versions[i]}\n".encode()

    def write(self, i: int) -> None:
        target = self.inbox / self.path(i)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.body(i))

    def write_all(self) -> None:
        self.versions = [0] * self.count
        for i in range(self.count):
            self.write(i)

    def change(self, sequence: int) -> None:
        """A different 5 % of the images get a new version (a stride per cut)."""
        step = int(1 / CHANGED)
        for i in range(sequence % step, self.count, step):
            self.versions[i] += 1
            self.write(i)

    def manifest(self, sequence: int, cut_time: datetime, missing: str | None = None) -> bytes:
        listed = self.count - (1 if missing else 0)  # the late file takes the last one's place
        entries = [
            {"path": self.path(i), "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
            for i, b in ((i, self.body(i)) for i in range(listed))
        ]
        page = f"<h1>Corte {sequence}</h1>".encode()
        (self.inbox / "index.html").write_bytes(page)
        entries.append(
            {"path": "index.html", "size": len(page), "sha256": hashlib.sha256(page).hexdigest()}
        )
        if missing is not None:
            late = hashlib.sha256(b"tarde").hexdigest()
            entries.append({"path": missing, "size": 5, "sha256": late})
        doc = {
            "format": "prep-cut/1",
            "election": ELECTION,
            "sequence": sequence,
            "cut_time": cut_time.isoformat(),
            "signed_at": (cut_time + timedelta(seconds=30)).isoformat(),
            "entry": "index.html",
            "files": sorted(entries, key=lambda e: str(e["path"])),
        }
        return json.dumps(doc, indent=1).encode()


def deliver(inbox: Path, institute: Institute, data: bytes) -> bytes:
    """Write the manifest, then its signature renamed into place; return the signature."""
    (inbox / MANIFEST).write_bytes(data)
    sig = ssh_sign(institute.key, data)
    tmp = inbox / ".sig.part"
    tmp.write_bytes(sig)
    os.replace(tmp, inbox / SIG)
    return sig


def journal_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.endswith("\n")]


def wait_published(daemon: AgentDaemon, sequence: int, timeout: float = 600) -> dict[str, Any]:
    """The ``cut-published`` event of ``sequence`` (SystemExit on a rejection or timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for e in journal_events(daemon.config.journal_file):
            if e["event"] == "cut-published" and e["sequence"] == sequence:
                return e
            if e["event"] == "cut-rejected" and e.get("sequence") == sequence:
                raise SystemExit(f"cut {sequence} rejected: {e}")
        if not daemon.running():
            raise SystemExit(f"agent exited: {daemon.output()}")
        time.sleep(0.1)
    raise SystemExit(f"cut {sequence} not published within {timeout} s")


def parse_figures(data: bytes, sig: bytes, institute: Institute, work: Path) -> dict[str, float]:
    config = make_config(work / "parse", institute)
    policy = load_policy(config)
    decide_s, parse_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        decide(data, sig, policy, Published(), datetime.now(OFFSET))
        decide_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        parse_manifest(data, Limits())
        parse_s.append(time.perf_counter() - t0)
    return {"decide_s": min(decide_s), "parse_s": min(parse_s)}


def run(files: int, releases: int, work: Path) -> dict[str, Any]:
    institute = Institute(work / "institute")
    config = make_config(
        work, institute, keep_releases=releases, keep_replaced_seconds=0, settle_timeout=300
    )
    pub = Publication(config.inbox, files)
    started = time.monotonic()
    pub.write_all()
    result: dict[str, Any] = {"write_s": time.monotonic() - started, "cuts": []}
    base = (datetime.now(OFFSET) - timedelta(hours=6)).replace(second=0, microsecond=0)
    first = pub.manifest(1, base)
    result["manifest_bytes"] = len(first)
    result.update(parse_figures(first, ssh_sign(institute.key, first), institute, work))
    daemon = AgentDaemon(work / "prep-agent.conf", work / "agent.log").start(timeout=60)
    assert daemon.proc is not None
    proc = psutil.Process(daemon.proc.pid)
    try:
        wait_cpu_quiet(proc)
        result["idle_rss"] = proc_status(proc.pid)["VmRSS"]
        for sequence in range(1, releases + 2):
            if sequence > 1:
                pub.change(sequence)
            data = (
                first
                if sequence == 1
                else pub.manifest(sequence, base + timedelta(minutes=sequence))
            )
            deliver(config.inbox, institute, data)
            event = wait_published(daemon, sequence)
            wait_cpu_quiet(proc)
            kept = len([n for n in os.listdir(config.releases) if not n.startswith(".")])
            result["cuts"].append(
                {
                    "sequence": sequence,
                    "releases": kept,
                    "rss": proc_status(proc.pid)["VmRSS"],
                    "verify_ms": event["verify_ms"],
                    "build_ms": event["build_ms"],
                    "total_ms": event["total_ms"],
                }
            )
            print(f"cut {sequence}: {result['cuts'][-1]}", flush=True)
        result["settle"] = settle(daemon, proc, pub, institute, releases + 2, base)
        result["peak_rss"] = proc_status(proc.pid)["VmHWM"]
    finally:
        daemon.stop(timeout=60)
    return result


def settle(
    daemon: AgentDaemon,
    proc: psutil.Process,
    pub: Publication,
    institute: Institute,
    sequence: int,
    base: datetime,
) -> dict[str, float]:
    """Phase 3: a cut missing one file, retried on drop-folder events for SETTLE_SECONDS."""
    inbox = daemon.config.inbox
    pub.change(sequence)
    late = "actas/tarde.jpg"
    deliver(inbox, institute, pub.manifest(sequence, base + timedelta(minutes=sequence), late))
    cpu0 = sum(proc.cpu_times()[:2])
    read0 = proc.io_counters().read_chars
    t0 = time.monotonic()
    while time.monotonic() - t0 < SETTLE_SECONDS:
        (inbox / "upload.part").write_bytes(b"x")
        time.sleep(0.25)
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    # Each retry reads the manifest once (and little else): retries = bytes read / its size.
    retries = (proc.io_counters().read_chars - read0) / (inbox / MANIFEST).stat().st_size
    waited = time.monotonic() - t0
    (inbox / late).write_bytes(b"tarde")
    t1 = time.monotonic()
    event = wait_published(daemon, sequence)
    return {
        "cpu_s": cpu,
        "retries": retries,
        "wall_s": waited,
        "publish_after_file_s": time.monotonic() - t1,
        "verify_ms": float(event["verify_ms"]),
    }


def report(
    res: dict[str, Any], files: int, releases: int, info: dict[str, str], command: str
) -> str:
    cuts = res["cuts"]
    full = next(c for c in cuts if c["releases"] == releases)
    # From cut 2 on: the first publication's build is the first to hold two manifests.
    second = cuts[min(1, len(cuts) - 1)]
    slope = (full["rss"] - second["rss"]) / max(1, full["releases"] - second["releases"])
    s = res["settle"]
    lines = [
        "# Manifest benchmark (`benchmarks/manifest.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}; kernel {info['kernel']}",
        f"- File system: {info['filesystem']}",
        f"- Python: {info['python']}; {info['versions']}",
        f"- Publication: {files} files ({files - 1} acta images + index.html), manifest "
        f"{res['manifest_bytes'] / MIB:.1f} MiB; {CHANGED:.0%} of the images change per cut; "
        f"keep_releases {releases}, keep_replaced_seconds 0; writing the drop folder took "
        f"{res['write_s']:.0f} s.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| `decide` (signature + parse), in process, best of 3 | {res['decide_s']:.2f} s |",
        f"| `parse_manifest` alone, in process, best of 3 | {res['parse_s']:.2f} s |",
        f"| agent idle RSS before the first cut | {res['idle_rss'] / MIB:.0f} MiB |",
        f"| agent RSS after cut 1 (1 release) | {cuts[0]['rss'] / MIB:.0f} MiB |",
        f"| agent RSS after cut {full['sequence']} ({releases} releases) | "
        f"{full['rss'] / MIB:.0f} MiB |",
        f"| agent RSS after cut {cuts[-1]['sequence']} (pruned to {cuts[-1]['releases']}) | "
        f"{cuts[-1]['rss'] / MIB:.0f} MiB |",
        f"| growth per retained release (cut 2 to cut {full['sequence']}) | "
        f"{slope / MIB:.1f} MiB |",
        f"| agent peak RSS (VmHWM) over the run | {res['peak_rss'] / MIB:.0f} MiB |",
        f"| agent CPU while a cut settles {s['wall_s']:.0f} s (an event every 0.25 s) | "
        f"{s['cpu_s']:.1f} s |",
        f"| retries in that time (manifest bytes read / its size) | {s['retries']:.1f} |",
        f"| agent CPU per retry | {s['cpu_s'] / max(s['retries'], 1):.2f} s |",
        f"| publication after the missing file arrived | {s['publish_after_file_s']:.1f} s |",
        "",
        "| cut | releases | RSS (MiB) | journal verify_ms | build_ms | total_ms |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cuts:
        lines.append(
            f"| {c['sequence']} | {c['releases']} | {c['rss'] / MIB:.0f} | {c['verify_ms']:.0f} | "
            f"{c['build_ms']:.0f} | {c['total_ms']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000, help="files per cut")
    parser.add_argument("--releases", type=int, default=10, help="keep_releases")
    parser.add_argument("--dir", metavar="DIR", help="work folder parent (default: a temp folder)")
    parser.add_argument("--out", metavar="FILE", help="also write the report here")
    args = parser.parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.manifest", *(argv or sys.argv[1:])])
    work = Path(tempfile.mkdtemp(prefix="prep-bench-manifest-", dir=args.dir))
    try:
        res = run(args.files - 1, args.releases, work)
        info = machine_info(work)
    finally:
        for dirpath, _dirs, _files in os.walk(work):
            os.chmod(dirpath, 0o755)
        shutil.rmtree(work, ignore_errors=True)
    text = report(res, args.files, args.releases, info, command)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
