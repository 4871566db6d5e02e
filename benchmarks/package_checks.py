#!/usr/bin/env python3
"""Package checks benchmark: ``inspect_package`` and ``render_results_pages`` on real data.

Packages: (1) the real Campeche delivery zip of inner zips, (2) the real
Campeche 2021-06-07 20:00 cut as one folder per election, (3) a ~50 MB (unpacked) package:
the real Sonora CSVs copied into 45 election folders (each with its own name,
so the stamps agree). Each is timed ``--runs`` times, in process, after one
warm-up; the baseline is ``unzip -q`` of the same bytes into a fresh folder
under /tmp (what ad-hoc difusor scripts run, without any check). Peak RSS of
this process is reported once at the end.

Usage, from the repository root:
  python -m benchmarks.package_checks [--runs N]
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from prep_agent.agent.package_pages import render_results_pages
from prep_agent.core.package import inspect_package

REAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "prep-real"
SONORA_COPIES = 45
"""Election folders of the big package, each holding one real Sonora CSV."""


def zip_of(members: dict[str, bytes]) -> bytes:
    """A deflated zip of ``members``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, data in members.items():
            archive.writestr(path, data)
    return buffer.getvalue()


def packages() -> list[tuple[str, str, bytes]]:
    """(label, file name, bytes) of the three packages."""
    delivery = (REAL / "campeche-2021-20210601_1852_PREP_CAMP.zip").read_bytes()
    cut = "20210607_2000"
    folders = {
        f"{folder.name}/{file.name}": file.read_bytes()
        for folder in sorted((REAL / "campeche-2021-cuts").glob(f"{cut}_PREP_*_CAMP"))
        for file in sorted(folder.iterdir())
    }
    sonora = sorted((REAL / "sonora-2021").glob("*.csv"))
    big: dict[str, bytes] = {}
    for number in range(SONORA_COPIES):
        source = sonora[number % len(sonora)]
        election = source.stem.split("_", 1)[1].rsplit("_", 1)[0]
        folder = f"20210607_1319_PREP_{election}_SON{number:02d}"
        big[f"{folder}/{source.name}"] = source.read_bytes()
    return [
        ("Campeche delivery zip (inner zips)", "20210601_1852_PREP_CAMP.zip", delivery),
        ("Campeche 20:00 cut (folders)", f"{cut}_PREP_CAMP.zip", zip_of(folders)),
        (f"Sonora CSVs x{SONORA_COPIES} (folders)", "20210607_1319_PREP_SON.zip", zip_of(big)),
    ]


def timed(action: Callable[[], object], runs: int) -> list[float]:
    """Milliseconds of ``runs`` calls of ``action`` after one warm-up."""
    action()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        action()
        times.append((time.perf_counter() - start) * 1000)
    return times


def unzip_baseline(data: bytes) -> None:
    """``unzip -q`` of ``data`` into a fresh folder, then remove it."""
    work = Path(tempfile.mkdtemp(prefix="prep-bench-unzip-"))
    try:
        (work / "p.zip").write_bytes(data)
        subprocess.run(["unzip", "-q", "p.zip", "-d", "out"], cwd=work, check=True)
    finally:
        shutil.rmtree(work)


def row(label: str, name: str, data: bytes, runs: int) -> str:
    """One Markdown table row: sizes and timings of one package."""
    package = inspect_package(name, data)
    unpacked = sum(len(part) for part in package.entries.values())
    inspect = timed(lambda: inspect_package(name, data), runs)
    render = timed(lambda: render_results_pages(package), runs)
    unzip = timed(lambda: unzip_baseline(data), runs)
    cells = [f"{statistics.median(t):.0f} ({max(t):.0f})" for t in (inspect, render, unzip)]
    return f"| {label} | {len(data) / 1e6:.1f} | {unpacked / 1e6:.1f} | {' | '.join(cells)} |"


def main() -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    runs = parser.parse_args().runs
    print(
        "| package | zip MB | unpacked MB | inspect ms p50 (max) | render ms p50 (max) "
        "| unzip -q ms p50 (max) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for label, name, data in packages():
        print(row(label, name, data, runs))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nPeak RSS of the benchmark process: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
