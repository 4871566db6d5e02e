"""``prep-agent demo``: the agent end to end on localhost with a simulated institute.

The simulated institute (``simulate``) signs a PREP publication with a demo
key every ``--interval`` seconds and delivers it into a local drop folder in
the institute's upload order (changed files, manifest, signature last). The
agent verifies and publishes each cut, and serves the frame on
http://127.0.0.1:PORT/.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from prep_agent.agent.config import load, render_template
from prep_agent.cli.options import AddCommand
from prep_agent.core import sshkeys
from prep_agent.daemon import serving
from prep_agent.institute.delivery import deliver_local
from prep_agent.institute.simulation.election import Simulation
from prep_agent.institute.simulation.run import run_institute

ELECTION = "coah-ayun-2021"
"""Election id of the demo (the simulated institute's)."""


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
    public = sshkeys.public_key_of(key).openssh()
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Run agent + simulated institute on localhost until Ctrl-C (or ``--cuts`` cuts)."""
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="prep-agent-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = load(setup(workdir, args.port))
    key = sshkeys.load_private_key((workdir / "institute_key").read_bytes())
    stop = threading.Event()

    def institute() -> None:
        def deliver(folder: Path) -> None:
            deliver_local(folder, config.inbox)
            print(f"institute: delivered cut {folder.name.lstrip('0')}", flush=True)

        run_institute(
            Simulation(), key, workdir / "institute", deliver, args.interval, args.cuts, stop
        )

    with serving(config) as (agent, server):
        threads = [
            threading.Thread(target=agent.run, name="agent"),
            threading.Thread(target=institute, name="institute"),
        ]
        for thread in threads:
            thread.start()
        print(f"prep-agent demo in {workdir}\nframe: http://{server.address}/", flush=True)
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
            for thread in threads:
                thread.join()
    return 0


def add_commands(add: AddCommand) -> None:
    """Register ``demo`` with the parser's ``add`` function."""
    p = add("demo", cmd_demo, "run agent + simulated institute on localhost")
    p.add_argument("--dir", metavar="DIR", help="working folder (default: a new temp folder)")
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
