#!/usr/bin/env python3
"""Audit benchmark: ``prep-agent audit --all`` of the 5,000-file / 60 MiB cut over loopback.

One real agent (``prep-agent run``) publishes the seeded cut of
``benchmarks.publish`` (same plan, same seed); the packaged nginx site
(``tests/nginxkit.py``, 127.0.0.1 exempt from its rate limits) serves it too.
Against each server, in turn, several rounds:

- ``prep-agent audit URL --trust … --all`` (the installed command, a process of
  its own: status.json, manifest + signature verified, every file fetched with
  ``--concurrency`` keep-alive connections, sized and hashed), at concurrency 8
  (the default) and 1;
- the baseline in the same run: ``wget`` of the same files (one process, one
  keep-alive connection, ``--input-file`` of their URLs: ``wget -r`` alone would
  find nothing to follow, the publication need not link every file) into a fresh
  folder, then ``sha256sum -c --quiet`` of the manifest's hashes there. The
  baseline checks no signature and reads no frame.

The embedded server keeps the files it served in memory (up to 64 MiB), nginx
reads them through the page cache: a warm-up audit runs first on each. The
median of the rounds is reported.

Usage: .venv/bin/python -m benchmarks.audit [--quick] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

from benchmarks.publish import (
    FULL,
    QUICK,
    SEED,
    Scale,
    Tree,
    machine_info,
    manifest_bytes,
    plan_files,
    write_all_new,
)
from tests.kit import OFFSET, PREP_AGENT, AgentDaemon, Institute, free_port, make_config, ssh_sign
from tests.nginxkit import Nginx, instantiate, wait_published

WGET = shutil.which("wget") or "/usr/bin/wget"


def timed(cmd: list[str], cwd: Path | None = None) -> tuple[float, str]:
    """Run ``cmd``; return its wall time (s) and its output. Raises on failure."""
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False, timeout=600)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(
            f"{cmd[0]} failed ({done.returncode}): {done.stdout[-500:]}{done.stderr[-500:]}"
        )
    return took, done.stdout


def audit_once(url: str, trust: Path, concurrency: int) -> float:
    took, out = timed(
        [
            PREP_AGENT,
            "audit",
            url,
            "--trust",
            str(trust),
            "--all",
            "--json",
            "--concurrency",
            str(concurrency),
        ]
    )
    report = json.loads(out)
    assert report["verdict"] == "intact" and report["checked"] == report["listed"], report
    return took


def baseline_once(url: str, release: str, tree: Tree, work: Path) -> float:
    """wget of every listed file, then sha256sum -c; the wall time of both."""
    target = work / "wget"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    urls = work / "urls.txt"
    urls.write_text("".join(f"{url}/cortes/{release}/{quote(p)}\n" for p in sorted(tree.files)))
    sums = work / "SHA256SUMS"
    sums.write_text("".join(f"{h}  {p}\n" for p, (_, h) in sorted(tree.files.items())))
    fetch, _ = timed([WGET, "-q", "-x", "-nH", "--cut-dirs=2", "-P", str(target), "-i", str(urls)])
    check, _ = timed(["sha256sum", "-c", "--quiet", str(sums)], cwd=target)
    return fetch + check


def run(scale: Scale, rounds: int, work: Path) -> dict[str, dict[str, list[float]]]:
    rng = random.Random(SEED)
    institute = Institute(work / "institute")
    listen = f"127.0.0.1:{free_port()}"
    config = make_config(work, institute, listen=listen)
    tree = Tree(rng, config.inbox)
    plan = plan_files(rng, scale)
    cut_time = (datetime.now(OFFSET) - timedelta(hours=1)).replace(second=0, microsecond=0)
    write_all_new(tree, plan, scale, cut_time, 1)
    data = manifest_bytes(tree, 1, cut_time)
    (config.inbox / "prep-manifest.json").write_bytes(data)
    agent = AgentDaemon(work / "prep-agent.conf")
    nginx: Nginx | None = None
    results: dict[str, dict[str, list[float]]] = {}
    try:
        agent.start(timeout=60)
        sig = config.inbox / "prep-manifest.json.sig"
        sig.write_bytes(ssh_sign(institute.key, data))
        release = str(wait_published(config.public, 1, timeout=300)["release"])
        port = free_port()
        nginx = Nginx(instantiate(work / "nginx", config.root, listen, port), port)
        nginx.start()
        servers = {"embedded": f"http://{listen}", "nginx": nginx.url}
        for name, url in servers.items():
            audit_once(url, institute.allowed_signers, 8)  # warm-up
            figures: dict[str, list[float]] = {"audit-8": [], "audit-1": [], "wget+sha256sum": []}
            for i in range(rounds):
                figures["audit-8"].append(audit_once(url, institute.allowed_signers, 8))
                figures["audit-1"].append(audit_once(url, institute.allowed_signers, 1))
                figures["wget+sha256sum"].append(baseline_once(url, release, tree, work))
                print(
                    f"  {name} round {i + 1}: "
                    + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in figures.items())
                )
            results[name] = figures
    finally:
        if nginx is not None:
            nginx.stop()
        agent.stop()
    results["_size"] = {
        "files": [float(len(tree.files))],
        "bytes": [float(sum(s for s, _ in tree.files.values()))],
    }
    return results


def report(results: dict[str, dict[str, list[float]]], command: str) -> str:
    info = machine_info(Path(tempfile.gettempdir()))
    size = results["_size"]
    lines = [
        "",
        "## Audit of a difusor's public copy (`benchmarks.audit`)",
        "",
        f"- Command: `{command}`",
        f"- Date: {info['date']}; machine: {info['machine']}; kernel {info['kernel']}; "
        f"{info['python']}. The machine is shared with other engineers' runs (loaded): "
        "figures are indicative, compare within the run.",
        f"- Cut: {int(size['files'][0])} files, {size['bytes'][0] / 1024**2:.1f} MiB "
        "(`benchmarks.publish`'s seeded plan), one agent, served by its embedded server "
        "and by the packaged nginx site, over loopback.",
        "- `prep-agent audit --all`: the installed command, signature first, every file "
        "sized and hashed; `wget+sha256sum`: `wget -i` of the same URLs (one keep-alive "
        "connection) into a fresh folder, then `sha256sum -c --quiet`. Median of the rounds "
        "(per-round figures printed by the run).",
        "",
        "| server | audit, 8 connections | audit, 1 connection | wget + sha256sum -c |",
        "|---|---:|---:|---:|",
    ]
    for name in ("embedded", "nginx"):
        f = results[name]
        cells = [
            f"{statistics.median(f[k]):.2f} s" for k in ("audit-8", "audit-1", "wget+sha256sum")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1,000 files / 12 MiB")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="append the report to this file")
    args = parser.parse_args()
    scale = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="prep-audit-bench-"))
    try:
        results = run(scale, max(1, min(args.rounds, 10)), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = report(results, "python -m benchmarks.audit " + " ".join(sys.argv[1:]))
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
