"""``prep-agent demo``: the agent end to end on localhost with a simulated institute.

A demo key signs a small PREP publication (an HTML page and a results CSV in
the PREP format, actas growing cut by cut) every ``--interval`` seconds and
delivers it into a local drop folder in the institute's upload order (files,
manifest, signature last). The agent verifies and publishes each cut, and the
published release is served on http://127.0.0.1:PORT/.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import tempfile
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from prep_agent import sshsig
from prep_agent.agent import Agent
from prep_agent.config import load, render_template
from prep_agent.manifest import MANIFEST_NAME, SIGNATURE_NAME
from prep_agent.sign import CutInfo, sign_folder

ELECTION = "coah-ayun-2021"
"""Election id of the demo."""
OFFSET = timezone(timedelta(hours=-6), "UTC-6")
"""Coahuila's offset, in which the demo stamps its cuts."""
TOTAL_ACTAS = 3_826


def write_publication(folder: Path, sequence: int, cut_time: datetime) -> None:
    """Write the simulated institute's publication for one cut into ``folder``."""
    captured = min(TOTAL_ACTAS, sequence * 400)
    stamp = cut_time.strftime("%d/%m/%Y %H:%M") + " (UTC-6)"
    csv = (
        "AYUNTAMIENTOS COAHUILA 2021\r\n"
        f"{stamp}\r\n"
        "ACTAS_ESPERADAS,ACTAS_CAPTURADAS,PORCENTAJE_ACTAS_CAPTURADAS\r\n"
        f"{TOTAL_ACTAS},{captured},{100 * captured / TOTAL_ACTAS:.4f}\r\n"
    )
    html = (
        '<!doctype html><html lang="es-MX"><meta charset="utf-8">'
        "<title>PREP Coahuila 2021 (simulado)</title>"
        "<h1>PREP Coahuila 2021 — Ayuntamientos (datos simulados)</h1>"
        f"<p>Corte de información: {stamp.replace(' (', ' h (')}</p>"
        f"<p>Actas capturadas: {captured} de {TOTAL_ACTAS}</p>"
        '<p><a href="datos/COAH_AYUN_2021.csv">Base de datos (CSV)</a></p></html>\n'
    )
    (folder / "datos").mkdir(parents=True, exist_ok=True)
    (folder / "datos" / "COAH_AYUN_2021.csv").write_text(csv, encoding="utf-8")
    (folder / "index.html").write_text(html, encoding="utf-8")


def deliver(source: Path, inbox: Path) -> None:
    """Copy a signed cut into the drop folder: data files, manifest, signature last."""
    last = (MANIFEST_NAME, SIGNATURE_NAME)
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and rel.as_posix() not in last:
            (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, inbox / rel)
    for name in last:
        tmp = inbox / f".{name}.part"
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, inbox / name)


class CurrentHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the release ``current`` points to at the moment of each request."""

    extensions_map = {  # noqa: RUF012 - the base class declares it a plain dict
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".html": "text/html; charset=utf-8",
        ".csv": "text/csv; charset=utf-8",
    }

    def __init__(self, *args: Any, current: Path, **kwargs: Any) -> None:
        super().__init__(*args, directory=os.path.realpath(current), **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def setup(workdir: Path, port: int) -> Path:
    """Create the demo key, allowed_signers and agent config; return the config path."""
    key = Ed25519PrivateKey.generate()
    (workdir / "institute_key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    public = sshsig.public_key_of(key).openssh()
    (workdir / "allowed_signers").write_text(f'iec-demo namespaces="prep-cut" {public}\n')
    config_path = workdir / "prep-agent.conf"
    config_path.write_text(
        render_template(
            election=ELECTION,
            root=workdir / "agent",
            inbox=workdir / "inbox",
            trust=workdir / "allowed_signers",
            threshold=1,
            listen=f"127.0.0.1:{port}",
        )
    )
    (workdir / "inbox").mkdir(exist_ok=True)
    return config_path


def simulate(workdir: Path, interval: float, cuts: int, stop: threading.Event) -> None:
    """Sign and deliver one cut every ``interval`` seconds until ``stop``."""
    key = sshsig.load_private_key((workdir / "institute_key").read_bytes())
    sequence = 0
    while not stop.is_set() and (cuts == 0 or sequence < cuts):
        sequence += 1
        cut_time = datetime.now(OFFSET).replace(second=0, microsecond=0)
        source = workdir / "institute" / f"{sequence:06d}"
        write_publication(source, sequence, cut_time)
        info = CutInfo(ELECTION, sequence, cut_time.isoformat(), period_seconds=600)
        sign_folder(source, key, info)
        deliver(source, workdir / "inbox")
        print(f"institute: delivered cut {sequence} ({cut_time:%d/%m/%Y %H:%M} UTC-6)", flush=True)
        stop.wait(interval)


def main(args: argparse.Namespace) -> int:
    """Run the demo until Ctrl-C (or ``--cuts`` cuts); return the exit status."""
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="prep-agent-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = setup(workdir, args.port)
    agent = Agent(load(config_path))
    stop = threading.Event()
    handler = functools.partial(CurrentHandler, current=agent.config.current)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    threads = [
        threading.Thread(target=agent.run, name="agent"),
        threading.Thread(target=simulate, args=(workdir, args.interval, args.cuts, stop)),
        threading.Thread(target=server.serve_forever, name="http"),
    ]
    for thread in threads:
        thread.start()
    print(f"prep-agent demo in {workdir}\npublished cut: http://127.0.0.1:{args.port}/", flush=True)
    try:
        threads[1].join()
        if args.cuts:
            stop.wait(min(args.interval, 5.0))
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        stop.set()
        agent.stop()
        server.shutdown()
        for thread in threads:
            thread.join()
        server.server_close()
    return 0
