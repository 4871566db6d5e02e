#!/usr/bin/env python3
"""Distribution benchmark: ``prep-agent distribute`` to 30 sftp targets on loopback.

One real ``sshd`` (internal-sftp, key login) serves 30 target folders per
method; 3 of the distribute targets are the drop folders of real
``prep-agent run`` agents. The cut is the 5,000-file / 60 MB tree of
``benchmarks.publish``: (a) all files new, (b) 5 % changed (plus the stamped
CSVs and index.html), a different 5 % each run.

Measured from "cut ready" (signed in its folder, before the command starts):
  holds   every target holds the complete cut (the last ``delivered`` line of
          ``prep-agent distribute``, which also does the local check first);
  serves  the 3 agents' status.json show the cut (polled every 20 ms).
Baselines, on their own 30 folders each, holding the previous cut like ours:
  sftp-seq   a loop of ``sftp -b`` per target (the changed files, manifest, signature);
  rsync-par  ``xargs -P 8 rsync -a -e ssh CUT/ TARGET/`` (parallel rsync over ssh);
  sftp-par   the floor of an sftp delivery: per target one ``sftp -b`` holding
             exactly the files to send (the script knows them: no hashing, no
             listing), the folders it lacks made, ``cd`` + ``put`` by name, the
             signature last; 8 targets at a time, as distribute's ``workers``,
             each over its own ssh master connection opened before the clock
             starts (distribute keeps its connections across cuts likewise).
Also: (b) with a 31st target black-holed (a network namespace dropping every
packet), and the institute process's peak RSS (VmHWM sampled every 20 ms) with
10 and with 30 targets.

Usage, as root from the repository root:
  .venv/bin/python -m benchmarks.distribute [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import requests  # type: ignore[import-untyped]  # no stubs in Debian 12

from benchmarks.publish import (
    FULL,
    KIB,
    MANIFEST,
    MIB,
    QUICK,
    SEED,
    SIG,
    Scale,
    Tree,
    machine_info,
    manifest_bytes,
    plan_files,
    write_all_new,
    write_changes,
)
from tests.distkit import BlackHole, Sshd, Target, write_config
from tests.kit import (
    OFFSET,
    PREP_AGENT,
    AgentDaemon,
    Institute,
    free_port,
    keygen,
    make_config,
    ssh_sign,
)

TARGETS = 30
AGENTS = 3
WORKERS = 8


@dataclass
class Run:
    """One measured distribution."""

    scenario: str
    holds: float
    serves: float | None
    peak_rss: int
    sent_bytes: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def vm_hwm(pid: int) -> int:
    """VmHWM of ``pid`` in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KIB
    except OSError:
        pass
    return 0


class Watch:
    """A running ``prep-agent distribute --watch``: its delivered lines and peak RSS."""

    def __init__(self, conf: Path, folder: Path) -> None:
        self.folder = folder
        self.peak = 0
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        command = [PREP_AGENT, "distribute", "--config", str(conf), "--no-confirm"]
        self.proc = subprocess.Popen(
            [*command, "--watch", str(folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append((time.monotonic(), line))
                self._cond.notify_all()

    def _sample(self) -> None:
        while self.proc.poll() is None:
            self.peak = max(self.peak, vm_hwm(self.proc.pid))
            time.sleep(0.02)

    def wait_delivered(self, sequence: int, count: int, timeout: float) -> list[tuple[float, int]]:
        """(time, bytes) of the first ``count`` targets that received ``sequence``."""
        prefix = f"delivered cut {sequence} "

        def found() -> list[tuple[float, int]]:
            return [
                (t, int(line.rsplit(", ", 1)[1].split()[0]))
                for t, line in self.lines
                if line.startswith(prefix)
            ]

        with self._cond:
            ok = self._cond.wait_for(lambda: len(found()) >= count, timeout)
            if not ok:
                tail = "".join(line for _, line in self.lines[-20:])
                raise RuntimeError(f"cut {sequence}: {len(found())}/{count} delivered\n{tail}")
            return found()[:count]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)


class Bench:
    """The targets, agents and cut folder of one benchmark run."""

    def __init__(self, work: Path, scale: Scale) -> None:
        self.work = work
        self.scale = scale
        self.institute = Institute(work / "institute")
        self.upload_key = work / "upload_key"
        self.sshd = Sshd(work / "sshd", [keygen(self.upload_key)])
        self.cut = work / "cut"
        self.tree = Tree(random.Random(SEED), self.cut)
        self.plan = plan_files(self.tree.rng, scale)
        self.sequence = 0
        self.base = datetime.now(OFFSET).replace(microsecond=0) - timedelta(hours=3)
        self.agents: list[AgentDaemon] = []
        self.status_urls: list[str] = []
        self.known_hosts = work / "known_hosts"
        self.changed: list[str] = []

    # --- setup ----------------------------------------------------------------------

    def start(self) -> None:
        self.sshd.start()
        self.known_hosts.write_text(self.sshd.known_hosts_line() + "\n")
        for i in range(AGENTS):
            port = free_port()
            make_config(self.work / f"agent{i}", self.institute, listen=f"127.0.0.1:{port}")
            self.agents.append(AgentDaemon(self.work / f"agent{i}" / "prep-agent.conf").start())
            self.status_urls.append(f"http://127.0.0.1:{port}/status.json")
        for method in ("seq", "rsync", "par"):
            for i in range(TARGETS):
                (self.work / method / f"t{i:02d}").mkdir(parents=True)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        for control in self.work.glob("par-master-*"):
            subprocess.run(["ssh", "-O", "exit", "-o", f"ControlPath={control}", "x"],
                           capture_output=True, timeout=10, check=False)  # fmt: skip
        self.sshd.stop()

    def targets(self, count: int, prefix: str = "t") -> list[Target]:
        common: dict[str, Any] = {
            "port": self.sshd.port,
            "host_key": self.sshd.known_hosts_line(),
            "identity": self.upload_key,
        }
        result = []
        for i in range(count):
            if prefix == "t" and i < AGENTS:
                inbox = self.work / f"agent{i}" / "inbox"
                result.append(
                    Target(f"agente-{i}", inbox, status_url=self.status_urls[i], **common)
                )
            else:
                inbox = self.work / prefix / f"{prefix}{i:02d}"
                inbox.mkdir(parents=True, exist_ok=True)
                result.append(Target(f"{prefix}-{i:02d}", inbox, **common))
        return result

    def config(self, name: str, targets: list[Target], **settings: object) -> Path:
        """A config in folder ``name`` (its own database); ``name/x.conf`` shares one."""
        folder, _, conf = name.partition("/")
        (self.work / folder).mkdir(exist_ok=True)
        values: dict[str, object] = {"workers": WORKERS, "retry_for": 30, "transfer_timeout": 300}
        values.update(settings)
        return write_config(
            self.work / folder / (conf or "institute.conf"),
            self.institute.allowed_signers,
            targets,
            **values,
        )

    # --- cuts -----------------------------------------------------------------------

    def next_cut(self, all_new: bool) -> Path:
        """Write the next cut folder as a PREP system would (unchanged files hard-linked
        from the previous cut), sign it, and return it (not yet in the watched folder)."""
        self.sequence += 1
        when = self.base + timedelta(minutes=self.sequence)
        folder = self.work / "staging" / f"{self.sequence:06d}"
        previous = self.cut
        if all_new or not self.tree.files:
            folder.mkdir(parents=True)
            self.tree.inbox = folder
            write_all_new(self.tree, self.plan, self.scale, when, self.sequence)
            self.changed = sorted(self.tree.files)
        else:
            subprocess.run(["cp", "-al", str(previous), str(folder)], check=True)
            for name in (MANIFEST, SIG):
                (folder / name).unlink()
            count = int(len(self.tree.plain) * self.scale.changed_fraction)
            chosen = self.tree.rng.sample(self.tree.plain, count)
            self.changed = sorted({*chosen, *self.tree.stamped, "index.html"})
            for rel in self.changed:  # new inodes: the previous cut keeps its bytes
                (folder / rel).unlink()
            self.tree.inbox = folder
            write_changes(self.tree, chosen, self.scale, when, self.sequence)
        data = manifest_bytes(self.tree, self.sequence, when)
        (folder / MANIFEST).write_bytes(data)
        (folder / SIG).write_bytes(ssh_sign(self.institute.key, data))
        self.cut = folder
        return folder

    # --- measuring ------------------------------------------------------------------

    def watch(self, conf: Path) -> Watch:
        """Start ``prep-agent distribute --watch`` on a fresh watched folder."""
        folder = self.work / f"watched-{conf.parent.name}-{conf.stem}"
        folder.mkdir()
        return Watch(conf, folder)

    def publish(self, watch: Watch, healthy: int, scenario: str, agents: bool = True) -> Run:
        """Move the newest cut into the watched folder; time every target holding and
        the agents serving it."""
        served: dict[str, float] = {}
        stop = threading.Event()
        sequence = self.sequence
        start = time.monotonic()
        os.rename(self.cut, watch.folder / self.cut.name)
        self.cut = watch.folder / self.cut.name

        def poll() -> None:
            with requests.Session() as session:
                while not stop.is_set() and len(served) < AGENTS:
                    for url in self.status_urls:
                        if url in served:
                            continue
                        try:
                            seq = session.get(url, timeout=2).json().get("sequence")
                        except (requests.RequestException, ValueError):
                            seq = None
                        if seq == sequence:
                            served[url] = time.monotonic() - start
                    time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True)
        if agents:
            poller.start()
        delivered = watch.wait_delivered(sequence, healthy, 600)
        holds = max(t for t, _ in delivered) - start
        deadline = time.monotonic() + 60
        while agents and len(served) < AGENTS and time.monotonic() < deadline:
            time.sleep(0.02)
        stop.set()
        if poller.is_alive():
            poller.join()
        serves = max(served.values()) if len(served) == AGENTS else None
        sent = sum(b for _, b in delivered)
        print(
            f"{scenario} cut {sequence}: holds {holds:.2f} s, serves {serves} s, {sent} bytes, "
            f"peak {watch.peak / MIB:.1f} MiB",
            file=sys.stderr,
            flush=True,
        )
        return Run(scenario, holds, serves, watch.peak, sent)

    def ssh_command(self) -> str:
        return shlex.join(
            [
                "ssh",
                *("-p", str(self.sshd.port), "-i", str(self.upload_key)),
                *("-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={self.known_hosts}"),
                *("-o", "StrictHostKeyChecking=yes"),
            ]
        )

    def sftp_sequential(self, all_files: bool) -> float:
        """A loop of ``sftp -b`` per target: changed files, manifest, signature last."""
        send = sorted(self.tree.files) if all_files else self.changed
        batch = self.work / "seq-batch"
        lines: list[str] = []
        made: set[str] = set()
        for rel in send:
            parts = rel.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                sub = "/".join(parts[:depth])
                if sub not in made:
                    made.add(sub)
                    lines.append(f'-mkdir "{sub}"')
            lines.append(f'put "{self.cut / rel}" "{rel}"')
        lines += [
            f'put "{self.cut / MANIFEST}" "{MANIFEST}"',
            f'put "{self.cut / SIG}" ".sig.part"',
        ]
        lines.append(f'rename ".sig.part" "{SIG}"')
        start = time.monotonic()
        for i in range(TARGETS):
            folder = self.work / "seq" / f"t{i:02d}"
            (folder / SIG).unlink(missing_ok=True)
            script = [f'cd "{folder}"', *lines]
            batch.write_text("\n".join(script) + "\n")
            subprocess.run(
                [
                    *("sftp", "-b", str(batch), "-P", str(self.sshd.port)),
                    *("-i", str(self.upload_key), "-o", "BatchMode=yes"),
                    *("-o", f"UserKnownHostsFile={self.known_hosts}", "root@127.0.0.1"),
                ],
                check=True,
                capture_output=True,
            )
        took = time.monotonic() - start
        print(f"sftp sequential: {took:.2f} s", file=sys.stderr, flush=True)
        return took

    def sftp_parallel(self, all_files: bool) -> float:
        """The floor of an sftp delivery: one ``sftp -b`` per target with exactly the
        files to send (folders it lacks made first, then ``cd`` and ``put`` by name:
        no stat of a remote name), the signature last; ``WORKERS`` targets at a time."""
        send = sorted(self.tree.files) if all_files else self.changed
        by_folder: dict[str, list[str]] = {}
        for rel in send:
            folder, _, name = rel.rpartition("/")
            by_folder.setdefault(folder, []).append(name)
        batches = []
        for i in range(TARGETS):
            root = self.work / "par" / f"t{i:02d}"
            (root / SIG).unlink(missing_ok=True)
            needed = {
                "/".join(d.split("/")[:k])
                for d in by_folder
                if d
                for k in range(1, d.count("/") + 2)
            }
            lines = [f'-mkdir "{root / d}"' for d in sorted(needed) if not (root / d).is_dir()]
            for folder, names in sorted(by_folder.items()):
                lines += [f'cd "{root / folder}"', f'lcd "{self.cut / folder}"']
                lines += [f'put "{name}"' for name in names]
            lines += [f'cd "{root}"', f'lcd "{self.cut}"', f'put "{MANIFEST}"']
            lines += [f'put "{SIG}" ".sig.part"', f'rename ".sig.part" "{SIG}"']
            batch = self.work / f"par-batch-{i:02d}"
            batch.write_text("\n".join(lines) + "\n")
            batches.append(batch)
        options = [
            *("-i", str(self.upload_key), "-o", "BatchMode=yes"),
            *("-o", f"UserKnownHostsFile={self.known_hosts}"),
        ]
        for i in range(TARGETS):  # the masters, once: not timed
            control = self.work / f"par-master-{i:02d}"
            if not control.exists():
                subprocess.run(
                    ["ssh", "-p", str(self.sshd.port), *options, "-o", "ControlMaster=yes",
                     "-o", f"ControlPath={control}", "-o", "ControlPersist=yes", "-fN",
                     "root@127.0.0.1"],
                    check=True, capture_output=True, timeout=30,
                )  # fmt: skip

        def deliver(i: int) -> None:
            control = self.work / f"par-master-{i:02d}"
            subprocess.run(
                ["sftp", "-P", str(self.sshd.port), *options, "-o", f"ControlPath={control}",
                 "-o", "ControlMaster=no", "-b", str(batches[i]), "root@127.0.0.1"],
                check=True, capture_output=True,
            )  # fmt: skip

        start = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(deliver, range(TARGETS)))
        took = time.monotonic() - start
        print(f"sftp parallel: {took:.2f} s", file=sys.stderr, flush=True)
        return took

    def rsync_parallel(self) -> float:
        """``xargs -P 8 rsync -a`` over ssh into the 30 rsync folders."""
        folders = "\n".join(str(self.work / "rsync" / f"t{i:02d}") for i in range(TARGETS))
        rsync = f"rsync -a -e {shlex.quote(self.ssh_command())} {shlex.quote(str(self.cut))}/"
        start = time.monotonic()
        subprocess.run(
            ["xargs", "-P", str(WORKERS), "-I", "{}", "sh", "-c", f"{rsync} root@127.0.0.1:{{}}/"],
            input=folders,
            text=True,
            check=True,
            capture_output=True,
        )
        took = time.monotonic() - start
        print(f"rsync: {took:.2f} s", file=sys.stderr, flush=True)
        return took


def p50(values: list[float]) -> float:
    return statistics.median(values)


def run(bench: Bench, a_runs: int, b_runs: int, sequential: bool = True) -> dict[str, Any]:
    """Every scenario (the sequential loop if ``sequential``); returns the figures."""
    results: dict[str, Any] = {
        k: [] for k in ("a", "b", "seq_a", "seq_b", "rsync_a", "rsync_b", "par_a", "par_b")
    }
    targets = bench.targets(TARGETS)
    conf = bench.config("main", targets)
    watch = bench.watch(conf)
    try:
        bench.next_cut(all_new=True)  # warm-up: every method's folders hold a cut
        bench.publish(watch, TARGETS, "warm-up")
        if sequential:
            bench.sftp_sequential(all_files=True)
        bench.rsync_parallel()
        bench.sftp_parallel(all_files=True)
        for kind, runs in (("a", a_runs), ("b", b_runs)):
            for _ in range(runs):
                bench.next_cut(all_new=kind == "a")
                results[kind].append(bench.publish(watch, TARGETS, kind))
                if sequential:
                    results[f"seq_{kind}"].append(bench.sftp_sequential(all_files=kind == "a"))
                results[f"rsync_{kind}"].append(bench.rsync_parallel())
                results[f"par_{kind}"].append(bench.sftp_parallel(all_files=kind == "a"))
    finally:
        watch.stop()
    with BlackHole(7) as hole:
        dark = Target(
            "sin-respuesta",
            bench.work / "dark",
            host=hole.address,
            host_key=bench.sshd.known_hosts_line(),
            identity=bench.upload_key,
        )
        conf_dark = bench.config("main/dark.conf", [*targets, dark], connect_timeout=10)
        watch = bench.watch(conf_dark)
        try:
            bench.next_cut(all_new=False)  # connections up; the dark target starts failing
            bench.publish(watch, TARGETS, "b + black hole, first")
            results["b_dark"] = []
            for _ in range(max(2, b_runs // 2)):
                bench.next_cut(all_new=False)
                results["b_dark"].append(bench.publish(watch, TARGETS, "b + black hole"))
        finally:
            watch.stop()
    for count, prefix in ((10, "r"), (TARGETS, "s")):
        fresh = bench.config(f"fresh{count}", bench.targets(count, prefix=prefix))
        watch = bench.watch(fresh)
        try:
            bench.next_cut(all_new=False)  # fresh targets: every file is new to them
            results[f"rss_{count}"] = bench.publish(
                watch, count, f"{count} new targets", False
            ).peak_rss
        finally:
            watch.stop()
    return results


def report(res: dict[str, Any], info: dict[str, str], command: str, scale: Scale) -> str:
    def row(name: str, values: list[float]) -> str:
        if not values:
            return f"| {name} | not run | | | 0 |"
        figures = f"{p50(values):.2f} | {min(values):.2f} | {max(values):.2f}"
        return f"| {name} | {figures} | {len(values)} |"

    a: list[Run] = res["a"]
    b: list[Run] = res["b"]
    ssh_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    lines = [
        "# Distribution benchmark (`benchmarks/distribute.py`)",
        "",
        f"Command: `{command}` (as root)",
        "",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']}; kernel {info['kernel']}",
        f"- Python: {info['python']}; {info['versions']}",
        f"- Tools: {info['tools']}; {ssh_version}",
        f"- Targets: {TARGETS} folders on one loopback sshd (internal-sftp), {AGENTS} of them drop "
        f"folders of real `prep-agent run` agents; `workers = {WORKERS}`; baselines on their own "
        f"{TARGETS} folders each, holding the previous cut like ours.",
        f"- Cut: {scale.files} files, {scale.total_bytes // MIB} MiB; (b) changes "
        f"{scale.changed_fraction:.0%} of the files plus the stamped CSVs and index.html.",
        "",
        "## Seconds from cut ready to every target holding it",
        "",
        "| method | p50 | min | max | runs |",
        "|---|---:|---:|---:|---:|",
        row("(a) distribute: 30 hold", [r.holds for r in a]),
        row("(a) distribute: 3 agents serve", [r.serves or float("nan") for r in a]),
        row("(a) sftp -b, sequential loop", res["seq_a"]),
        row("(a) rsync over ssh, xargs -P 8", res["rsync_a"]),
        row("(a) sftp -b of exactly the files, 8 in parallel (floor)", res["par_a"]),
        row("(b) distribute: 30 hold", [r.holds for r in b]),
        row("(b) distribute: 3 agents serve", [r.serves or float("nan") for r in b]),
        row("(b) sftp -b, sequential loop", res["seq_b"]),
        row("(b) rsync over ssh, xargs -P 8", res["rsync_b"]),
        row("(b) sftp -b of exactly the files, 8 in parallel (floor)", res["par_b"]),
        "",
        "## A black-holed 31st target (connect_timeout 10 s, retried all along)",
        "",
        "| method | p50 | min | max | runs |",
        "|---|---:|---:|---:|---:|",
        row("(b) distribute: 30 healthy hold, 31st black-holed", [r.holds for r in res["b_dark"]]),
        row("(b) distribute: 30 hold, no black hole (above)", [r.holds for r in b]),
        "",
        "## Peak RSS of the institute process (VmHWM)",
        "",
        f"- 10 new targets (all files): {res['rss_10'] / MIB:.1f} MiB",
        f"- 30 new targets (all files): {res['rss_30'] / MIB:.1f} MiB",
        f"- (a) runs: {', '.join(f'{r.peak_rss / MIB:.1f}' for r in a)} MiB; "
        f"(b) runs: {', '.join(f'{r.peak_rss / MIB:.1f}' for r in b)} MiB",
        "",
    ]
    return "\n".join(lines)


@contextmanager
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="prep-dist-bench-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1,000 files, 1 + 3 runs")
    parser.add_argument("--out", metavar="FILE", help="append the report to FILE")
    parser.add_argument(
        "--runs", type=int, nargs=2, metavar=("A", "B"), help="runs of (a) and of (b)"
    )
    parser.add_argument(
        "--no-sequential", action="store_true", help="leave out the sequential sftp loop"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmark needs root (sshd, network namespace)", file=sys.stderr)
        return 2
    scale = QUICK if args.quick else FULL
    a_runs, b_runs = args.runs or ((1, 3) if args.quick else (1, 5))
    with workdir() as work:
        bench = Bench(work, scale)
        bench.start()
        try:
            res = run(bench, a_runs, b_runs, not args.no_sequential)
        finally:
            bench.stop()
        text = report(
            res,
            machine_info(work),
            "python -m benchmarks.distribute " + " ".join(argv or sys.argv[1:]),
            scale,
        )
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
