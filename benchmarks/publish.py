#!/usr/bin/env python3
"""Publication benchmark: latency, baselines and memory of the real ``prep-agent run``.

A seeded cut of 5,000 files / ~60 MB (many small HTML/JSON/CSV, some of
hundreds of KB, a few of MBs) is delivered into a drop folder the way the
institute does it (files, manifest, then the signature renamed into place),
and a separate ``prep-agent run`` daemon (inotify) publishes it.

Scenarios:
  (a) all files new (every byte hashed and copied);
  (b) 5 % of the files changed (the rest reused by hard link), each run a
      different 5 %; the stamped CSVs and index.html change every cut.
  (a-big) like (a) plus 4 files of 60 MB: the peak RSS must not grow.

Latency = time from the signature's ``os.replace`` into the drop folder to
``current`` pointing at the new release (polled with ``os.readlink`` every
~1 ms). The agent's own journal figures (``total_ms``, ``build_ms``, ...) are
reported too.

Baselines, run in the same process on the same data, file system and page-cache
state (warm: everything was just written, as after an upload):
  rsync   ``rsync -a --checksum --link-dest=PREV INBOX/ NEW/`` (+ ``sync -f NEW``)
  sha+cp  ``sha256sum CHANGED...`` + ``cp --parents -t NEW CHANGED...`` (+ ``sync -f NEW``)
The agent makes its release durable with ``syncfs`` before the swap, so the
baselines are compared *with* ``sync -f``; figures without it are shown too.
Before every timed operation the whole file system is synced, so nobody pays
for somebody else's dirty pages.

Peak memory is the kernel's VmHWM of the agent process, reset before each
(a) cut by writing ``5`` to ``/proc/PID/clear_refs`` (psutil sampling at 5 ms
is the fallback when that is not allowed).

Usage, from the repository root:
  .venv/bin/python -m benchmarks.publish [--quick] [--out FILE] [--dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psutil

from tests.kit import ELECTION, OFFSET, PREP_AGENT, AgentDaemon, Institute, make_config, ssh_sign

KIB = 1024
MIB = 1024 * 1024
SEED = 20210606
SIG = "prep-manifest.json.sig"
MANIFEST = "prep-manifest.json"


@dataclass
class Scale:
    """Sizes of one benchmark run."""

    files: int
    total_bytes: int
    stamped: int
    a_runs: int
    b_runs: int
    big_files: int
    big_bytes: int
    changed_fraction: float = 0.05


FULL = Scale(
    files=5000,
    total_bytes=60 * MIB,
    stamped=20,
    a_runs=3,
    b_runs=15,
    big_files=4,
    big_bytes=60 * MIB,
)
QUICK = Scale(
    files=1000,
    total_bytes=12 * MIB,
    stamped=10,
    a_runs=1,
    b_runs=5,
    big_files=4,
    big_bytes=12 * MIB,
)


# --------------------------------------------------------------------------- the data


@dataclass
class Tree:
    """The publication tree as the institute holds it: path -> (size, sha256)."""

    rng: random.Random
    inbox: Path
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    stamped: list[str] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)

    def write(self, rel: str, data: bytes) -> None:
        target = self.inbox / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(data)
        self.files[rel] = (len(data), hashlib.sha256(data).hexdigest())

    def write_big(self, rel: str, size: int) -> None:
        """A large file written in 4 MiB chunks (the benchmark stays small too)."""
        target = self.inbox / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        with open(target, "wb") as fh:
            left = size
            while left:
                chunk = self.rng.randbytes(min(4 * MIB, left))
                fh.write(chunk)
                digest.update(chunk)
                left -= len(chunk)
        self.files[rel] = (size, digest.hexdigest())

    def remove(self, rel: str) -> None:
        (self.inbox / rel).unlink()
        del self.files[rel]


def _log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(round(lo * (hi / lo) ** rng.random()))


def plan_files(rng: random.Random, scale: Scale) -> dict[str, int]:
    """Paths and sizes: ~90 % of 0.5-16 KiB, ~10 % of 16-400 KiB, 0.1 % of 1-3 MiB."""
    n = scale.files - scale.stamped - 1  # minus the stamped CSVs and index.html
    n_large = max(1, n // 1000)
    n_medium = n // 10
    n_small = n - n_medium - n_large
    small = [_log_uniform(rng, 512, 16 * KIB) for _ in range(n_small)]
    large = [_log_uniform(rng, 1 * MIB, 3 * MIB) for _ in range(n_large)]
    medium = [_log_uniform(rng, 16 * KIB, 400 * KIB) for _ in range(n_medium)]
    stamped_bytes = scale.stamped * 40 * KIB + 8 * KIB
    # Scale the medium class so that the cut totals the target size.
    room = scale.total_bytes - sum(small) - sum(large) - stamped_bytes
    factor = max(0.1, room / max(1, sum(medium)))
    medium = [max(16 * KIB, int(s * factor)) for s in medium]
    sections = ("ayuntamientos", "diputaciones", "casillas", "mapas", "descargas")
    plan: dict[str, int] = {}
    for i, size in enumerate(small):
        ext = rng.choices(("html", "json", "csv", "svg"), (40, 35, 20, 5))[0]
        plan[f"{sections[i % 4]}/{i % 97:03d}/p{i:05d}.{ext}"] = size
    for i, size in enumerate(medium):
        ext = rng.choices(("csv", "json", "html"), (45, 35, 20))[0]
        plan[f"{sections[i % 4]}/{i % 97:03d}/m{i:05d}.{ext}"] = size
    for i, size in enumerate(large):
        plan[f"descargas/l{i:03d}.{('csv', 'pdf')[i % 2]}"] = size
    return plan


def content(rng: random.Random, rel: str, size: int) -> bytes:
    """Bytes of a non-stamped file: text-like head, random body (size exact)."""
    head = b"CLAVE,VOTOS\r\n1,2\r\n" if rel.endswith(".csv") else b"<!-- prep -->\n"
    return (head + rng.randbytes(max(0, size - len(head))))[:size]


def stamped_csv(rng: random.Random, cut_time: datetime, size: int) -> bytes:
    """A PREP CSV whose line 2 stamps ``cut_time`` (UTC-6), padded to ``size``."""
    stamp = cut_time.strftime("%d/%m/%Y %H:%M") + " (UTC-6)"
    head = f"AYUNTAMIENTOS 2021\r\n{stamp}\r\nCLAVE,ESTADO,TIPO,VOTOS\r\n".encode()
    body = rng.randbytes(max(0, size - len(head))).hex().encode()
    return (head + body)[:size].ljust(size, b"0")


def index_html(sequence: int) -> bytes:
    return f"<!doctype html><h1>Corte {sequence}</h1>{'x' * 8000}".encode()


def stamped_names(scale: Scale) -> list[str]:
    return [f"datos/COAH_AYUN_2021_{i:02d}.csv" for i in range(scale.stamped)]


def write_all_new(
    tree: Tree, plan: dict[str, int], scale: Scale, cut_time: datetime, seq: int
) -> None:
    """(a): every file gets new content (new hashes): nothing is reusable."""
    for rel, size in plan.items():
        tree.write(rel, content(tree.rng, rel, size))
    for rel in stamped_names(scale):
        tree.write(rel, stamped_csv(tree.rng, cut_time, 40 * KIB))
    tree.write("index.html", index_html(seq))
    tree.stamped = stamped_names(scale)
    tree.plain = list(plan)


def write_changes(
    tree: Tree, chosen: list[str], scale: Scale, cut_time: datetime, seq: int
) -> None:
    """(b): the stamped CSVs, index.html and ``chosen`` get new content."""
    for rel in chosen:
        old = tree.files[rel][0]
        size = max(64, int(old * tree.rng.uniform(0.9, 1.1)))
        tree.write(rel, content(tree.rng, rel, size))
    for rel in tree.stamped:
        tree.write(rel, stamped_csv(tree.rng, cut_time, 40 * KIB))
    tree.write("index.html", index_html(seq))


def manifest_bytes(tree: Tree, seq: int, cut_time: datetime) -> bytes:
    doc = {
        "format": "prep-cut/1",
        "election": ELECTION,
        "sequence": seq,
        "cut_time": cut_time.isoformat(),
        "signed_at": (cut_time + timedelta(seconds=30)).isoformat(),
        "entry": "index.html",
        "files": [{"path": p, "size": s, "sha256": h} for p, (s, h) in sorted(tree.files.items())],
    }
    return json.dumps(doc, indent=1).encode()


# --------------------------------------------------------------------------- measuring


def sync_all() -> None:
    """Flush every dirty page, so the next timed operation pays only for itself."""
    os.sync()


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of ``pid`` in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * KIB
    return out


class PeakMeter:
    """Peak RSS of a process over an interval: VmHWM reset via clear_refs, or sampling."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.proc = psutil.Process(pid)
        self.method = "VmHWM (reset by /proc/PID/clear_refs)"
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.resettable = True
        except OSError:
            self.resettable = False
            self.method = "psutil RSS sampled every 5 ms"

    def start(self) -> int:
        """Begin an interval; return the RSS at its start."""
        if self.resettable:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return proc_status(self.pid)["VmRSS"]
        self._peak = self.proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self._peak

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._peak = max(self._peak, self.proc.memory_info().rss)

    def stop(self) -> int:
        """End the interval; return the peak RSS in it."""
        if self.resettable:
            return proc_status(self.pid)["VmHWM"]
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self._peak


def wait_cpu_quiet(proc: psutil.Process, window: float = 0.15, budget: float = 0.005) -> None:
    """Wait until the agent used less than ``budget`` CPU seconds in ``window`` (pruning done)."""
    deadline = time.monotonic() + 30
    last = sum(proc.cpu_times()[:2])
    while time.monotonic() < deadline:
        time.sleep(window)
        now = sum(proc.cpu_times()[:2])
        if now - last < budget:
            return
        last = now


def read_events(journal: Path) -> list[dict[str, Any]]:
    if not journal.exists():
        return []
    with open(journal, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def wall(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


@dataclass
class AgentRun:
    """One published cut, as seen from outside and by the agent's journal."""

    external_ms: float
    total_ms: float
    verify_ms: float
    build_ms: float
    swap_ms: float
    wake_ms: float
    bytes_copied: int
    rss_start: int = 0
    rss_peak: int = 0


class AgentUnderTest:
    """A ``prep-agent run`` process on a fresh root."""

    def __init__(self, config_path: Path, root: Path, log: Path) -> None:
        self.root = root
        self.journal = root / "journal.jsonl"
        self.current = root / "current"
        self.daemon = AgentDaemon(config_path, log).start(timeout=30)
        assert self.daemon.proc is not None
        self.popen = self.daemon.proc
        self.proc = psutil.Process(self.popen.pid)
        self.watcher = self.daemon.started.get("watcher")
        self.meter = PeakMeter(self.popen.pid)

    def publish(self, inbox: Path, sig: bytes, seq: int, measure_peak: bool = False) -> AgentRun:
        """Rename the signature into place; time until ``current`` is the new release."""
        prefix = f"{seq:016d}-"
        tmp = inbox / ".sig.part"
        tmp.write_bytes(sig)
        sync_all()
        time.sleep(0.3)  # the agent has handled the upload's events and sleeps again
        wait_cpu_quiet(self.proc)
        rss_start = self.meter.start() if measure_peak else 0
        os.replace(tmp, inbox / SIG)
        t_wall = time.time()
        t0 = time.monotonic()
        deadline = t0 + 120
        while True:
            try:
                if os.readlink(self.current).rpartition("/")[2].startswith(prefix):
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline or self.popen.poll() is not None:
                raise SystemExit(f"cut {seq} not published: {read_events(self.journal)[-3:]}")
            time.sleep(0.001)
        external = (time.monotonic() - t0) * 1000
        published = seen = None
        while published is None:
            events = read_events(self.journal)
            for e in events:
                if e["event"] == "cut-published" and e["sequence"] == seq:
                    published = e
            time.sleep(0.005)
        for e in events:
            if e["event"] == "cut-seen" and wall(e["time"]) >= t_wall - 0.002:
                seen = e
                break
        wait_cpu_quiet(self.proc)
        rss_peak = self.meter.stop() if measure_peak else 0
        return AgentRun(
            external_ms=external,
            total_ms=published["total_ms"],
            verify_ms=published["verify_ms"],
            build_ms=published["build_ms"],
            swap_ms=published["swap_ms"],
            wake_ms=(wall(seen["time"]) - t_wall) * 1000 if seen else float("nan"),
            bytes_copied=published["bytes_copied"],
            rss_start=rss_start,
            rss_peak=rss_peak,
        )

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def stop(self) -> None:
        self.daemon.stop(timeout=30)


def timed(cmd: list[str], cwd: Path | None = None) -> float:
    """Run ``cmd``; return its wall time in ms."""
    t0 = time.monotonic()
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return (time.monotonic() - t0) * 1000


@dataclass
class Baseline:
    work_ms: float
    sync_ms: float

    @property
    def total_ms(self) -> float:
        return self.work_ms + self.sync_ms


class Baselines:
    """rsync --link-dest chain and sha256sum + cp of the changed files, beside the agent."""

    def __init__(self, base: Path, inbox: Path) -> None:
        self.base = base
        self.inbox = inbox
        self.prev: Path | None = None
        base.mkdir(parents=True, exist_ok=True)

    def rsync(self, seq: int) -> Baseline:
        new = self.base / f"rsync-{seq:05d}"
        cmd = ["rsync", "-a", "--checksum", f"--exclude={MANIFEST}*"]
        if self.prev is not None:
            cmd.append(f"--link-dest={self.prev}")
        cmd += [f"{self.inbox}/", f"{new}/"]
        sync_all()
        work = timed(cmd)
        synced = timed(["sync", "-f", str(new)])
        self.prev = new
        return Baseline(work, synced)

    def sha_cp(self, seq: int, changed: list[str]) -> Baseline:
        new = self.base / f"cp-{seq:05d}"
        new.mkdir()
        sync_all()
        t0 = time.monotonic()
        subprocess.run(
            ["sha256sum", "--", *changed], cwd=self.inbox, check=True, stdout=subprocess.DEVNULL
        )
        subprocess.run(
            ["cp", "--parents", "-t", str(new), "--", *changed], cwd=self.inbox, check=True
        )
        work = (time.monotonic() - t0) * 1000
        synced = timed(["sync", "-f", str(new)])
        return Baseline(work, synced)


# --------------------------------------------------------------------------- the run


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def cmd_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "?"
    return out.splitlines()[0].strip() if out else "?"


def machine_info(work: Path) -> dict[str, str]:
    cpu = "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    fs = subprocess.run(
        ["df", "--output=fstype,source", str(work)], capture_output=True, text=True, check=False
    ).stdout.split()[2:]
    import cryptography
    import watchdog.version

    from prep_agent import __version__

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} CPUs ({cpu}), {psutil.virtual_memory().total // MIB} MiB RAM",
        "kernel": platform.release(),
        "filesystem": f"{' '.join(fs)} (work dir {work})",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": (
            f"prep-agent {__version__}, cryptography {cryptography.__version__}, "
            f"watchdog {watchdog.version.VERSION_STRING}, psutil {psutil.__version__}"
        ),
        "tools": "; ".join(
            cmd_version(c) for c in (["rsync", "--version"], ["sha256sum", "--version"])
        ),
    }


def run(scale: Scale, work: Path) -> dict[str, Any]:
    rng = random.Random(SEED)
    institute = Institute(work / "institute")
    config = make_config(work, institute, keep_releases=10)
    inbox = config.inbox
    tree = Tree(rng, inbox)
    plan = plan_files(rng, scale)
    base_time = (datetime.now(OFFSET) - timedelta(hours=6)).replace(second=0, microsecond=0)
    baselines = Baselines(work / "baselines", inbox)
    agent = AgentUnderTest(work / "prep-agent.conf", config.root, work / "agent.log")
    results: dict[str, Any] = {"a": [], "b": [], "big": None, "watcher": agent.watcher}
    try:
        time.sleep(1.0)
        wait_cpu_quiet(agent.proc)
        results["idle_rss"] = agent.rss()
        seq = 0

        def deliver(measure_peak: bool = False) -> AgentRun:
            data = manifest_bytes(tree, seq, cut_time)
            (inbox / MANIFEST).write_bytes(data)
            return agent.publish(inbox, ssh_sign(institute.key, data), seq, measure_peak)

        # (a) all new; the first cut also warms up the agent (imports, caches).
        for i in range(scale.a_runs + 1):
            seq += 1
            cut_time = base_time + timedelta(minutes=seq)
            write_all_new(tree, plan, scale, cut_time, seq)
            run_a = deliver(measure_peak=True)
            rs = baselines.rsync(seq)
            sc = baselines.sha_cp(seq, sorted(tree.files))
            label = "warm-up" if i == 0 else f"a{i}"
            print(f"  {label}: {fmt_run(run_a)} | rsync {fmt_bl(rs)} | sha256sum+cp {fmt_bl(sc)}")
            if i > 0:
                results["a"].append((run_a, rs, sc))
        results["a_bytes"] = sum(s for s, _ in tree.files.values())
        results["a_files"] = len(tree.files)

        # (b) a different 5 % each time (stamped CSVs and index.html always among them).
        n_changed = round(len(tree.files) * scale.changed_fraction)
        rotating = n_changed - len(tree.stamped) - 1
        order = list(tree.plain)
        rng.shuffle(order)
        for i in range(scale.b_runs):
            seq += 1
            cut_time = base_time + timedelta(minutes=seq)
            chosen = order[i * rotating : (i + 1) * rotating]
            write_changes(tree, chosen, scale, cut_time, seq)
            changed = sorted([*chosen, *tree.stamped, "index.html"])
            run_b = deliver()
            rs = baselines.rsync(seq)
            sc = baselines.sha_cp(seq, changed)
            print(f"  b{i + 1}: {fmt_run(run_b)} | rsync {fmt_bl(rs)} | sha256sum+cp {fmt_bl(sc)}")
            results["b"].append((run_b, rs, sc))
        results["b_changed"] = n_changed
        results["b_changed_bytes"] = p50([r.bytes_copied for r, _, _ in results["b"]])

        # (a-big): all new again, plus a few big files: peak RSS must stay put.
        seq += 1
        cut_time = base_time + timedelta(minutes=seq)
        write_all_new(tree, plan, scale, cut_time, seq)
        for k in range(scale.big_files):
            tree.write_big(f"descargas/big-{k}.bin", scale.big_bytes)
        run_big = deliver(measure_peak=True)
        print(f"  a-big: {fmt_run(run_big)}")
        results["big"] = run_big
        results["big_bytes"] = sum(s for s, _ in tree.files.values())
        results["big_max_file"] = scale.big_bytes
        results["peak_method"] = agent.meter.method
    finally:
        agent.stop()
    return results


def fmt_run(r: AgentRun) -> str:
    peak = f", peak {r.rss_peak / MIB:.1f} MiB" if r.rss_peak else ""
    return (
        f"agent {r.external_ms:7.1f} ms (journal total {r.total_ms:.1f}, build {r.build_ms:.1f}, "
        f"wake {r.wake_ms:.0f}){peak}"
    )


def fmt_bl(b: Baseline) -> str:
    return f"{b.work_ms:6.1f} + sync {b.sync_ms:5.1f} ms"


# --------------------------------------------------------------------------- report


def report(res: dict[str, Any], scale: Scale, info: dict[str, str], command: str) -> str:
    a, b = res["a"], res["b"]

    def col(rows: list[Any], pick: Any) -> list[float]:
        return [pick(r) for r in rows]

    a_ext = col(a, lambda r: r[0].external_ms)
    b_ext = col(b, lambda r: r[0].external_ms)
    a_rs = col(a, lambda r: r[1].total_ms)
    b_rs = col(b, lambda r: r[1].total_ms)
    a_sc = col(a, lambda r: r[2].total_ms)
    big = res["big"]
    a_peak = max(r[0].rss_peak for r in a)
    a_start = max(r[0].rss_start for r in a)

    def line(name: str, rows: list[Any], pick: Any) -> str:
        v = col(rows, pick)
        return f"| {name} | {p50(v):.1f} | {p95(v):.1f} | {min(v):.1f} | {max(v):.1f} |"

    lines = [
        "# Publication benchmark (`benchmarks/publish.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}; kernel {info['kernel']}",
        f"- File system: {info['filesystem']}",
        f"- Python: {info['python']}; {info['versions']}",
        f"- Tools: {info['tools']}",
        f"- Agent: `prep-agent run` as a separate process, watcher `{res['watcher']}`, "
        "default config (keep_releases 10, stamp_check reject)",
        "",
        "## Workload",
        "",
        f"- (a) all new: {res['a_files']} files, {res['a_bytes'] / MIB:.1f} MiB "
        f"(seeded mix: ~90 % 0.5-16 KiB HTML/JSON/CSV/SVG, ~10 % 16-400 KiB, "
        f"0.1 % 1-3 MiB; {scale.stamped} stamped CSVs + index.html); "
        f"{len(a)} measured runs after 1 warm-up cut.",
        f"- (b) {scale.changed_fraction:.0%} changed: {res['b_changed']} files "
        f"(~{res['b_changed_bytes'] / MIB:.1f} MiB) per cut, a different set each time "
        f"(stamped CSVs and index.html every time); {len(b)} runs.",
        f"- (a-big): like (a) plus {scale.big_files} files of {scale.big_bytes / MIB:.0f} MiB "
        f"= {res['big_bytes'] / MIB:.0f} MiB in all.",
        "- Latency (`agent ext`): signature `os.replace`d into the drop folder -> `current` "
        "points at the new release (readlink polled every ~1 ms). `journal total` is the "
        "agent's own `total_ms` (verify + build + swap; without the inotify wake-up), "
        "`wake` = signature rename -> journal `cut-seen` (ms resolution).",
        "- Page cache: warm for everybody (files were just written, as after an upload); "
        "the file system is `sync`ed before each timed operation. The agent `syncfs`es "
        "before its swap, so baselines are compared including `sync -f NEW`.",
        "- Baselines on the same drop folder right after the agent: "
        "`rsync -a --checksum --link-dest=PREV INBOX/ NEW/` (PREV = rsync's previous "
        "copy) and `sha256sum CHANGED...; cp --parents -t NEW CHANGED...` (all files "
        "in (a)).",
        "",
        "## Latency (ms)",
        "",
        "| figure | p50 | p95 | min | max |",
        "|---|---:|---:|---:|---:|",
        line("(b) agent ext: signature -> current", b, lambda r: r[0].external_ms),
        line("(b) agent journal total_ms", b, lambda r: r[0].total_ms),
        line("(b) agent journal verify_ms", b, lambda r: r[0].verify_ms),
        line("(b) agent journal build_ms", b, lambda r: r[0].build_ms),
        line("(b) agent journal swap_ms", b, lambda r: r[0].swap_ms),
        line("(b) wake: signature -> cut-seen", b, lambda r: r[0].wake_ms),
        line("(b) rsync --checksum --link-dest + sync -f", b, lambda r: r[1].total_ms),
        line("(b) rsync ... without sync", b, lambda r: r[1].work_ms),
        line("(b) sha256sum + cp changed + sync -f", b, lambda r: r[2].total_ms),
        line("(b) sha256sum + cp changed without sync", b, lambda r: r[2].work_ms),
        line("(a) agent ext: signature -> current", a, lambda r: r[0].external_ms),
        line("(a) agent journal total_ms", a, lambda r: r[0].total_ms),
        line("(a) agent journal verify_ms", a, lambda r: r[0].verify_ms),
        line("(a) agent journal build_ms", a, lambda r: r[0].build_ms),
        line("(a) rsync --checksum --link-dest + sync -f", a, lambda r: r[1].total_ms),
        line("(a) rsync ... without sync", a, lambda r: r[1].work_ms),
        line("(a) sha256sum + cp all + sync -f", a, lambda r: r[2].total_ms),
        line("(a) sha256sum + cp all without sync", a, lambda r: r[2].work_ms),
        f"| (a-big) agent ext / journal total_ms | {big.external_ms:.1f} | "
        f"{big.total_ms:.1f} | | |",
        "",
        f"## Memory of the agent process ({res['peak_method']})",
        "",
        "| figure | MiB |",
        "|---|---:|",
        f"| idle RSS (started, before any cut) | {res['idle_rss'] / MIB:.1f} |",
        f"| RSS at the start of (a) (max over runs) | {a_start / MIB:.1f} |",
        f"| peak RSS during (a), {res['a_bytes'] / MIB:.0f} MiB cut (max over runs) | "
        f"{a_peak / MIB:.1f} |",
        f"| RSS at the start of (a-big) | {big.rss_start / MIB:.1f} |",
        f"| peak RSS during (a-big), {res['big_bytes'] / MIB:.0f} MiB cut, largest file "
        f"{res['big_max_file'] / MIB:.0f} MiB | {big.rss_peak / MIB:.1f} |",
        "",
    ]
    ratio = p50(a_ext) / p50(a_sc)
    a_growth = max(r[0].rss_peak - r[0].rss_start for r in a)
    big_growth = big.rss_peak - big.rss_start
    growth = big_growth - a_growth
    verdicts = [
        ("(b) p50 latency <= 250 ms", p50(b_ext) <= 250, f"{p50(b_ext):.1f} ms"),
        (
            "(b) faster than rsync (p50, both durable)",
            p50(b_ext) < p50(b_rs),
            f"{p50(b_ext):.1f} vs {p50(b_rs):.1f} ms "
            f"(rsync without sync: {p50(col(b, lambda r: r[1].work_ms)):.1f} ms)",
        ),
        (
            "(a) within 1.5x of sha256sum + cp (p50, both durable)",
            ratio <= 1.5,
            f"{p50(a_ext):.1f} vs {p50(a_sc):.1f} ms = {ratio:.2f}x "
            f"(vs cp without sync: {p50(a_ext) / p50(col(a, lambda r: r[2].work_ms)):.2f}x)",
        ),
        (
            "(a) faster than rsync (p50)",
            p50(a_ext) < p50(a_rs),
            f"{p50(a_ext):.1f} vs {p50(a_rs):.1f} ms",
        ),
        (
            "peak RSS does not grow with file size (rise during a-big <= rise during (a) + 4 MiB)",
            growth <= 4 * MIB,
            f"rise over the cut's start RSS: (a-big) {big_growth / MIB:+.1f} MiB vs (a) "
            f"{a_growth / MIB:+.1f} MiB, for +{(res['big_bytes'] - res['a_bytes']) / MIB:.0f} MiB "
            "of data",
        ),
    ]
    lines += ["## Targets", "", "| target | verdict | figures |", "|---|---|---|"]
    lines += [f"| {n} | {'PASS' if ok else 'FAIL'} | {f} |" for n, ok, f in verdicts]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (1,000 files)")
    parser.add_argument(
        "--out",
        metavar="FILE",
        help="write the report here (default: benchmarks/RESULTS.md, "
        "not written by --quick unless given)",
    )
    parser.add_argument("--dir", metavar="DIR", help="work folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--loop-ext4",
        type=int,
        metavar="GIB",
        help="run on a fresh ext4 of GIB GiB (loop-mounted image; root only), "
        "so file-system history does not skew the figures",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.loop_ext4:
        with loop_ext4(args.loop_ext4) as mount:
            return run_main(args, scale_for(args), mount)
    return run_main(args, scale_for(args), Path(args.dir) if args.dir else None)


def scale_for(args: argparse.Namespace) -> Scale:
    return QUICK if args.quick else FULL


@contextlib.contextmanager
def loop_ext4(gib: int) -> Iterator[Path]:
    """A new ext4 (default options: journal) in a sparse image, mounted for the run."""
    holder = Path(tempfile.mkdtemp(prefix="prep-bench-fs-", dir="/var/tmp"))
    image, mount = holder / "fs.img", holder / "mnt"
    mount.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(gib * 1024**3)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        shutil.rmtree(holder, ignore_errors=True)


def run_main(args: argparse.Namespace, scale: Scale, parent: Path | None) -> int:
    out = (
        Path(args.out)
        if args.out
        else (None if args.quick else Path(__file__).with_name("RESULTS.md"))
    )
    if not Path(PREP_AGENT).exists():
        raise SystemExit(f"{PREP_AGENT} missing: run `make deps`")
    work = Path(tempfile.mkdtemp(prefix="prep-bench-", dir=parent))
    command = shlex.join([".venv/bin/python", "-m", "benchmarks.publish", *args.argv])
    print(f"work folder {work}; {scale.files} files, {scale.total_bytes / MIB:.0f} MiB")
    started = time.monotonic()
    try:
        res = run(scale, work)
        info = machine_info(work)
        if args.loop_ext4:
            info["filesystem"] += f", a fresh {args.loop_ext4} GiB loop-mounted ext4 image"
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = report(res, scale, info, command)
    text += f"\nFull run took {time.monotonic() - started:.0f} s.\n"
    print()
    print(text)
    if out is not None:
        out.write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
