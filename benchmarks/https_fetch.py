"""Benchmark of the https-package fetch stage (``agent/fetch.py``) against ``curl``.

Method: a loopback HTTPS server (Python's ``http.server`` over TLS, in its own
process, certificate from a test CA made here) serves two signed packages: the real
Campeche 2021 delivery zip (~66 KiB) and a 50 MiB zip of seeded random bytes
(stored). In the same run, for each package:

- ours: one ``Fetcher.poll()`` with a fresh fetcher (no validators): index-free fixed
  URL, TLS verified against the test CA, whole-zip checks, ``.sig`` fetched and
  verified (``require_signature``), in this process;
- ours, unchanged: a second poll of the same fetcher (conditional GET, ``304``);
- ``curl -sS --fail --cacert CA -o FILE URL`` of the same package (a new process each
  time, so its start-up is included), and ``curl`` then ``unzip -tq`` of it.

The fetch stage only: the package checks and the publication are not part of it yet.

    python -m benchmarks.https_fetch                      # appends to benchmarks/RESULTS.md
    python -m benchmarks.https_fetch --runs 3 --out /tmp/r.md
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from datetime import datetime, timezone
from pathlib import Path

import requests  # type: ignore[import-untyped]
from cryptography.hazmat.primitives.asymmetric import ed25519

from prep_agent.agent.fetch import Fetcher, Settings
from prep_agent.core import sshkeys, sshsig
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.core.protocol import NAMESPACE_PACKAGE
from prep_agent.institute.simulation.testca import issue, make_ca, write_server_files

PROJECT = Path(__file__).resolve().parent.parent
CAMPECHE = PROJECT.parent / "shared/fixtures/prep-real/campeche-2021-20210601_1852_PREP_CAMP.zip"
BIG_NAME = "20210606_2000_PREP_BIG.zip"


def serve(folder: Path, cert: Path, key: Path) -> None:
    """The server process: serve ``folder`` over TLS on a free port; print the port."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    print(server.server_address[1], flush=True)
    server.serve_forever()


def start_server(www: Path, cert: Path, key: Path) -> tuple[subprocess.Popen[str], int]:
    """Serve ``www`` over HTTPS in a child process (``serve``); return it and its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.https_fetch", "--serve", str(www), str(cert), str(key)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def big_zip(size: int) -> bytes:
    """A stored zip of ``size`` seeded random bytes."""
    rng = random.Random(2021)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("datos.bin", rng.randbytes(size))
    return buffer.getvalue()


def since(started: float) -> float:
    """Milliseconds since ``started`` (``time.perf_counter()``)."""
    return (time.perf_counter() - started) * 1000


def measure(
    first: Fetcher, data: bytes, url: str, ca_file: Path, out: Path, runs: int
) -> tuple[list[float], list[float], list[float], list[float]]:
    """``runs`` timings (ms) of: a fresh poll, an unchanged poll, curl, curl + unzip -t."""
    ours, unchanged, curl, curl_unzip = [], [], [], []
    command = ["curl", "-sS", "--fail", "--cacert", str(ca_file), "-o", str(out), url]
    for _ in range(runs):
        fetcher = Fetcher(first.settings, first.signers)
        started = time.perf_counter()
        package = fetcher.poll(datetime.now(timezone.utc))
        ours.append(since(started))
        assert package is not None and package.data == data and package.signed_by
        started = time.perf_counter()
        assert fetcher.poll(datetime.now(timezone.utc)) is None
        unchanged.append(since(started))
        started = time.perf_counter()
        subprocess.run(command, check=True)
        curl.append(since(started))
        started = time.perf_counter()
        subprocess.run(command, check=True)
        subprocess.run(["unzip", "-tq", str(out)], check=True, capture_output=True)
        curl_unzip.append(since(started))
    return ours, unchanged, curl, curl_unzip


def row(label: str, values: list[float]) -> str:
    """A markdown row: p50, min, max."""
    return f"| {label} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} |"


def main() -> int:
    """Run the benchmark; write its markdown report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per figure (default 10)")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--serve", nargs=3, metavar=("DIR", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*(Path(p) for p in args.serve))
        return 0
    work = Path(tempfile.mkdtemp(prefix="prep-fetch-bench-"))
    proc = None
    try:
        ca = make_ca()
        ca_file, cert, key = write_server_files(work / "tls", ca, issue(ca))
        www = work / "www"
        www.mkdir()
        private = ed25519.Ed25519PrivateKey.generate()
        public = sshkeys.public_key_of(private)
        packages = {
            CAMPECHE.name.split("-", 2)[2]: CAMPECHE.read_bytes(),
            BIG_NAME: big_zip(50 * 1024**2),
        }
        for name, data in packages.items():
            (www / name).write_bytes(data)
            (www / f"{name}.sig").write_bytes(
                sshsig.armor(sshsig.sign(private, data, NAMESPACE_PACKAGE))
            )
        proc, port = start_server(www, cert, key)
        signers = parse_allowed_signers(f"bench {public.openssh()}\n")
        lines = []
        for name, data in packages.items():
            url = f"https://127.0.0.1:{port}/{name}"
            settings = Settings(
                url, ca_file=str(ca_file), require_signature=True, max_bytes=64 * 1024**2
            )
            requests.get(url, verify=str(ca_file)).raise_for_status()  # warm the page cache
            ours, unchanged, curl, curl_unzip = measure(
                Fetcher(settings, signers), data, url, ca_file, work / "curl.zip", args.runs
            )
            size = (
                f"{len(data) / 1024**2:.2f} MiB"
                if len(data) > 1024**2
                else f"{len(data) / 1024:.1f} KiB"
            )
            lines += [
                row(f"{name} ({size}): ours, poll (download + zip checks + .sig verified)", ours),
                row(f"{name}: ours, unchanged (304)", unchanged),
                row(f"{name}: curl -o (new process)", curl),
                row(f"{name}: curl -o + unzip -tq", curl_unzip),
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
    curl_version = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    text = (
        f"""
# HTTPS package fetch benchmark (`benchmarks/https_fetch.py`)

Command: `python -m benchmarks.https_fetch --runs {args.runs}`

- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC
- Machine: {os.cpu_count()} CPUs, shared with other engineers' work while this ran (figures are
  noisy and pessimistic); kernel {platform.release()}
- Python: {platform.python_version()}, requests {requests.__version__}
- curl: {" ".join(curl_version.split()[:2])}
- Server: Python's http.server over TLS 1.3 on loopback, its own process; test CA (ECDSA P-256)
- The fetch stage only (no package checks, no publication yet). Ours runs in-process; each
  curl is a new process (its start-up is included).

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
