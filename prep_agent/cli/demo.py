"""``prep-agent demo``: the agent end to end on localhost with a simulated institute.

The simulated institute (``simulate``) signs a PREP publication with a demo
key every ``--interval`` seconds and, by default (``--source drop-folder``),
delivers it into a local drop folder in the institute's upload order (changed
files, manifest, signature last). With ``--source https-package`` it publishes
each cut as a signed PREP package zip served over HTTPS on loopback with a test
CA (``simulate --serve-https``), and the agent polls it. Either way the agent
verifies and publishes each cut, and serves the frame on http://127.0.0.1:PORT/.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from prep_agent.agent.config import load, render_template
from prep_agent.cli.options import AddCommand
from prep_agent.core import sshkeys
from prep_agent.daemon import serving

if TYPE_CHECKING:
    from prep_agent.institute.simulation.https import PackagePublisher

ELECTION = "coah-ayun-2021"
"""Election id of the demo (the simulated institute's)."""
SOURCES = ("drop-folder", "https-package")
"""The agent's sources the demo can run (``--source``)."""
FIRST_PACKAGE_WAIT = 30.0
"""Seconds the https-package demo waits for the institute's first package."""


def setup(workdir: Path, port: int, publisher: PackagePublisher | None = None) -> Path:
    """Create the demo key (unless there), allowed_signers and agent config; return
    the config path. With ``publisher`` the agent polls its packages (https-package,
    signatures required, a poll a second)."""
    if not (workdir / "institute_key").exists():
        make_key(workdir)
    key = sshkeys.load_private_key((workdir / "institute_key").read_bytes())
    public = sshkeys.public_key_of(key).openssh()
    (workdir / "allowed_signers").write_text(
        f'iec-demo namespaces="prep-cut,prep-package" {public}\n'
    )
    source = {}
    if publisher is not None:
        source = {
            "source_type": "https-package",
            "source_url": publisher.url,
            "ca_file": publisher.ca_file,
        }
    text = render_template(
        election=ELECTION,
        root=workdir / "agent",
        inbox=workdir / "inbox",
        trust=workdir / "allowed_signers",
        threshold=1,
        listen=f"127.0.0.1:{port}",
        **source,
    )
    if publisher is not None:
        at = text.index("[source]")
        text = text[:at] + text[at:].replace(
            "require_signature = false", "require_signature = true"
        ).replace("poll_seconds = 30", "poll_seconds = 1")
    config_path = workdir / "prep-agent.conf"
    config_path.write_text(text)
    (workdir / "inbox").mkdir(exist_ok=True)
    return config_path


def make_key(workdir: Path) -> None:
    """Write a new demo institute key (ed25519, OpenSSH format) to ``institute_key``."""
    key = Ed25519PrivateKey.generate()
    (workdir / "institute_key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Run agent + simulated institute on localhost until Ctrl-C (or ``--cuts`` cuts)."""
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="prep-agent-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    make_key(workdir)  # a new demo key each run, as before
    key = sshkeys.load_private_key((workdir / "institute_key").read_bytes())
    # Imported here: the simulated institute is a sixth of every command's
    # start-up, and only the demo runs it.
    from prep_agent.institute.simulation.https import PackagePublisher

    publisher = None
    if args.source == "https-package":
        publisher = PackagePublisher(workdir / "institute", key, "127.0.0.1", 0)
        print(f"institute: serving PREP packages at {publisher.url}", flush=True)
    try:
        return _run(args, workdir, key, publisher)
    finally:
        if publisher is not None:
            publisher.close()


def _run(
    args: argparse.Namespace,
    workdir: Path,
    key: sshkeys.PrivateKey,
    publisher: PackagePublisher | None,
) -> int:
    """The demo's agent and institute threads, until Ctrl-C or ``--cuts`` cuts."""
    from prep_agent.institute.delivery import deliver_local
    from prep_agent.institute.simulation.election import Simulation
    from prep_agent.institute.simulation.run import MinuteApart, run_institute

    config = load(setup(workdir, args.port, publisher))
    stop = threading.Event()

    def institute() -> None:
        def deliver(folder: Path) -> None:
            deliver_local(folder, config.inbox)
            print(f"institute: delivered cut {folder.name.lstrip('0')}", flush=True)

        outdir = workdir / "institute"
        if publisher is None:
            run_institute(Simulation(), key, outdir, deliver, args.interval, args.cuts, stop)
        else:
            clock = MinuteApart()
            run_institute(
                Simulation(), key, outdir, publisher, args.interval, args.cuts, stop, clock
            )

    with serving(config) as (agent, server):
        institute_thread = threading.Thread(target=institute, name="institute")
        threads = [institute_thread, threading.Thread(target=agent.run, name="agent")]
        try:
            institute_thread.start()
            if publisher is not None:  # so that the agent's first poll finds a package
                _wait_first_package(publisher, institute_thread)
            threads[1].start()
            print(f"prep-agent demo in {workdir}\nframe: http://{server.address}/", flush=True)
            institute_thread.join()
            if args.cuts:
                stop.wait(min(args.interval, 5.0))
            else:
                threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping", flush=True)
        finally:
            stop.set()
            agent.stop()
            for thread in threads:
                if thread.ident is not None:
                    thread.join()
    return 0


def _wait_first_package(publisher: PackagePublisher, institute: threading.Thread) -> None:
    """Return once the institute published its first package (or stopped), at most
    ``FIRST_PACKAGE_WAIT`` seconds."""
    deadline = time.monotonic() + FIRST_PACKAGE_WAIT
    while publisher.newest() is None and institute.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)


def add_commands(add: AddCommand) -> None:
    """Register ``demo`` with the parser's ``add`` function."""
    p = add("demo", cmd_demo, "run agent + simulated institute on localhost")
    p.add_argument("--dir", metavar="DIR", help="working folder (default: a new temp folder)")
    p.add_argument(
        "--source",
        choices=SOURCES,
        default=SOURCES[0],
        help="how cuts reach the agent: a drop folder (default) or PREP packages over HTTPS",
    )
    p.add_argument("--port", type=int, default=8080, help="localhost port (default 8080)")
    p.add_argument(
        "--interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds between simulated cuts (default 10)",
    )
    p.add_argument(
        "--cuts",
        type=int,
        default=0,
        metavar="N",
        help="stop after N cuts (default: run until Ctrl-C)",
    )
