"""Benchmark: poll-to-published latency of an https-package agent against curl + unzip + cp.

Method: a loopback HTTPS server (``benchmarks.https_fetch``'s, in its own process,
test CA) serves each package at a fixed URL. For each package, in the same run:

- ours: a fresh agent root (``Agent`` built untimed, ``[source] type =
  https-package``), then one timed ``Agent.step()``: the poll (download, zip
  checks, ``.sig`` looked up: 404, unsigned), ``inspect_package``, the results
  pages, the release written read-only and flushed (``syncfs``), the swap,
  ``status.json`` and the frame, the state and the journal; in this process;
- the ad-hoc script difusores run today: ``curl -sS --fail --cacert CA -o F URL``,
  ``unzip -q F -d DIR``, ``cp -r DIR DEST`` (new processes, start-up included; no
  check, no atomicity, no flush).

Packages: the real Campeche 2021 delivery zip; the real Campeche 2021-06-07 20:00
cut; a 50 MiB package (that cut plus a 49 MiB stored member of seeded random
bytes); the real Sonora CSVs copied into 45 election folders (52 MiB of CSV: the
page rendering cost).

    python -m benchmarks.package_publish                  # appends to benchmarks/RESULTS.md
    python -m benchmarks.package_publish --runs 2 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from benchmarks.https_fetch import start_server
from benchmarks.package_checks import packages
from prep_agent.agent.config import load, render_template
from prep_agent.core import sshkeys
from prep_agent.daemon import Agent
from prep_agent.institute.simulation.testca import issue, make_ca, write_server_files

PROJECT = Path(__file__).resolve().parent.parent
BIG_NAME = "20210607_2000_PREP_BIG.zip"


def big_package(cut_zip: bytes, size: int) -> bytes:
    """The Campeche cut ``cut_zip`` plus a stored member of seeded random bytes, to
    ``size`` bytes in all (about)."""
    rng = random.Random(2021)
    buffer = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(cut_zip)) as source, zipfile.ZipFile(buffer, "w") as out:
        for info in source.infolist():
            out.writestr(info, source.read(info), zipfile.ZIP_DEFLATED)
        filler = size - len(cut_zip)
        out.writestr("anexos/datos.bin", rng.randbytes(filler), zipfile.ZIP_STORED)
    return buffer.getvalue()


def since(started: float) -> float:
    """Milliseconds since ``started`` (``time.perf_counter()``)."""
    return (time.perf_counter() - started) * 1000


def agent_for(work: Path, url: str, ca_file: Path, trust: Path) -> Agent:
    """A fresh agent root polling ``url``."""
    text = render_template(
        election="bench-2021",
        root=work / "root",
        inbox=work / "inbox",
        trust=trust,
        threshold=1,
        listen="127.0.0.1:0",
        source_type="https-package",
        source_url=url,
        ca_file=ca_file,
    )
    text = text.replace("max_package_bytes = 268435456", "max_package_bytes = 134217728")
    conf = work / "prep-agent.conf"
    conf.write_text(text)
    return Agent(load(conf))


def measure(
    work: Path, url: str, ca_file: Path, trust: Path, name: str, runs: int
) -> tuple[list[float], list[float]]:
    """``runs`` timings (ms) of ours (one step, poll to published) and of the script."""
    ours, script = [], []
    for run in range(runs):
        folder = work / f"ours-{run}"
        folder.mkdir()
        agent = agent_for(folder, url, ca_file, trust)
        started = time.perf_counter()
        outcome = agent.step()
        ours.append(since(started))
        assert outcome.status == "published", outcome
        target = work / f"script-{run}"
        started = time.perf_counter()
        subprocess.run(
            ["curl", "-sS", "--fail", "--cacert", str(ca_file), "-o", f"{target}.zip", url],
            check=True,
        )
        subprocess.run(["unzip", "-q", f"{target}.zip", "-d", f"{target}.d"], check=True)
        subprocess.run(["cp", "-r", f"{target}.d", f"{target}.pub"], check=True)
        script.append(since(started))
        shutil.rmtree(folder, ignore_errors=True)
        for leftover in (f"{target}.d", f"{target}.pub"):
            shutil.rmtree(leftover, ignore_errors=True)
    return ours, script


def row(label: str, values: list[float]) -> str:
    """A markdown row: p50, min, max."""
    return f"| {label} | {statistics.median(values):.0f} | {min(values):.0f} | {max(values):.0f} |"


def main() -> int:
    """Run the benchmark; append its markdown report to ``--out``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "RESULTS.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="prep-publish-bench-"))
    proc = None
    try:
        ca = make_ca()
        ca_file, cert, key = write_server_files(work / "tls", ca, issue(ca))
        trust = work / "allowed_signers"
        public = sshkeys.public_key_of(ed25519.Ed25519PrivateKey.generate())
        trust.write_text(f'bench namespaces="prep-package" {public.openssh()}\n')
        www = work / "www"
        www.mkdir()
        chosen = packages()
        cut = chosen[1][2]
        chosen.insert(
            2, ("50 MiB (the 20:00 cut + 49 MiB stored)", BIG_NAME, big_package(cut, 50 * 1024**2))
        )
        for _label, name, data in chosen:
            (www / name).write_bytes(data)
        proc, port = start_server(www, cert, key)
        lines = []
        for label, name, data in chosen:
            url = f"https://127.0.0.1:{port}/{name}"
            ours, script = measure(work, url, ca_file, trust, name, args.runs)
            size = f"{len(data) / 1024**2:.1f} MiB"
            lines += [
                row(f"{label}, {size}: ours, poll to published (`Agent.step`)", ours),
                row(f"{label}: curl + unzip + cp -r (new processes)", script),
            ]
        report(args, lines)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, lines: list[str]) -> None:
    """Append the report to ``args.out``."""
    load_avg = os.getloadavg()[0]
    text = (
        f"""
# Poll-to-published latency of a PREP package (`benchmarks/package_publish.py`)

Command: `PYTHONPATH=. nice .venv/bin/python -m benchmarks.package_publish --runs {args.runs}`

- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, CPython
  {platform.python_version()}. The machine was shared with other engineers' work (load
  average {load_avg:.2f} at the end), so figures are noisy and pessimistic.
- Ours: one `Agent.step()` of a fresh root, in process (poll, checks, pages, release
  flushed with `syncfs`, swap, status and frame, state, journal); the script: curl, unzip,
  cp as new processes, no check and no flush. Same server, same bytes, same run.

| figure (ms, {args.runs} runs) | p50 | min | max |
|---|---:|---:|---:|
"""
        + "\n".join(lines)
        + "\n"
    )
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
