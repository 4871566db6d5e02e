"""The ``prep-agent`` command line.

Exit codes: 0 success; 2 usage, configuration or environment error; 3 the cut
is (or would be) rejected; 4 another agent holds the lock; 70 unexpected error
(traceback in the log file named on stderr).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any, Callable

from prep_agent import __version__
from prep_agent.agent.config import Config, load, render_template
from prep_agent.agent.journal import Journal
from prep_agent.agent.lock import LockFile
from prep_agent.agent.state import load_state, save_state
from prep_agent.agent.store import Store, read_inbox_file
from prep_agent.core.errors import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_REJECTED,
    ConfigError,
    Error,
    Rejection,
)
from prep_agent.core.freshness import freshness, stale_at
from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME
from prep_agent.core.verify import MAX_SIGNATURE_BYTES, decide
from prep_agent.daemon import Agent, load_policy, published_view, utc_now
from prep_agent.institute import sign
from prep_agent.report import generate as report
from prep_agent.web.frame import write_public
from prep_agent.web.server import Server, build_app

log = logging.getLogger("prep_agent")


def _config(args: argparse.Namespace) -> Config:
    return load(Path(args.config))


def cmd_init(args: argparse.Namespace) -> int:
    """Write a commented config file and create the folder layout."""
    root = Path(args.root).resolve()
    inbox = Path(args.inbox).resolve() if args.inbox else root / "inbox"
    trust = Path(args.trust).resolve()
    config_path = Path(args.config) if args.config else root / "prep-agent.conf"
    if not trust.is_file():
        raise ConfigError(f"allowed_signers file {trust} does not exist")
    if config_path.exists() and not args.force:
        raise ConfigError(f"{config_path} exists (use --force to overwrite)")
    text = render_template(
        election=args.election,
        root=root,
        inbox=inbox,
        trust=trust,
        threshold=args.threshold,
        listen=args.listen,
    )
    for folder in (root, inbox, root / "releases", root / "staging", root / "quarantine"):
        folder.mkdir(parents=True, exist_ok=True)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(text, encoding="utf-8")
    config = load(config_path)
    load_policy(config)
    print(f"wrote {config_path}; drop folder {inbox}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    """The daemon: watch the drop folder and publish cuts until stopped."""
    config = _config(args)
    config.root.mkdir(parents=True, exist_ok=True)
    with LockFile(config.lock_file):
        agent = Agent(config)
        if args.once:
            outcome = agent.run(once=True)
            _print_outcome(outcome.status, outcome.sequence, outcome.rejection)
            return EXIT_REJECTED if outcome.status == "rejected" else EXIT_OK

        def _stop(signum: int, frame: FrameType | None) -> None:
            agent.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        server = Server(config, build_app(config, agent.snapshot, agent.metrics))
        server.start()
        agent.journal.write("server-listening", address=server.address)
        try:
            agent.run()
        finally:
            server.stop()
    return EXIT_OK


def _print_outcome(status: str, sequence: int | None, rejection: Rejection | None) -> None:
    if rejection is not None:
        print(f"{status}: {rejection.reason}: {rejection.detail}")
    elif sequence is not None:
        print(f"{status}: sequence {sequence}")
    else:
        print(status)


def cmd_verify(args: argparse.Namespace) -> int:
    """Decide a cut in DIR (default: the drop folder) without publishing it."""
    config = _config(args)
    folder = Path(args.dir).resolve() if args.dir else config.inbox
    policy = load_policy(config)
    store = Store(config.root, config.limits)
    try:
        sig = read_inbox_file(folder, SIGNATURE_NAME, MAX_SIGNATURE_BYTES)
        data = read_inbox_file(folder, MANIFEST_NAME, config.limits.max_manifest_bytes)
        if sig is None or data is None:
            raise Rejection("incomplete", f"no {SIGNATURE_NAME} and {MANIFEST_NAME} in {folder}")
        published = published_view(store, load_state(config.state_file))
        decision = decide(data, sig, policy, published, utc_now())
        if not decision.already_published:
            store.check(
                decision.manifest, folder, config.stamp_check, lambda w: print(f"warning: {w}")
            )
    except Rejection as exc:
        print(f"rejected: {exc.reason}: {exc.detail}")
        return EXIT_REJECTED
    m = decision.manifest
    verdict = "already published" if decision.already_published else "accepted"
    print(
        f"{verdict}: sequence {m.sequence}, cut_time {m.cut_time_text}, {len(m.files)} files, "
        f"signed by {', '.join(decision.signers)}"
    )
    return EXIT_OK


def status_document(config: Config) -> dict[str, Any]:
    """What ``status --json`` prints: derived from ``current`` and the state."""
    store = Store(config.root, config.limits)
    state = load_state(config.state_file)
    current = store.current()
    manifest = current.manifest if current else None
    now = utc_now()
    return {
        "election": config.election,
        "sequence": manifest.sequence if manifest else None,
        "cut_time": manifest.cut_time_text if manifest else None,
        "manifest_sha256": current.manifest_sha256 if current else None,
        "current_path": str(current.path) if current else None,
        "final": manifest.final if manifest else None,
        "state": freshness(manifest, now, config.stale_periods),
        "stale_at": stale_at(manifest, config.stale_periods).isoformat() if manifest else None,
        "highest_sequence": state.highest_sequence,
        "last_rejection": asdict(state.last_rejection) if state.last_rejection else None,
        "releases": store.release_names(),
    }


def cmd_status(args: argparse.Namespace) -> int:
    """Print what is published, its freshness and the last rejection."""
    doc = status_document(_config(args))
    if args.json:
        print(json.dumps(doc, indent=2, ensure_ascii=False))
        return EXIT_OK
    for key, value in doc.items():
        if key != "releases":
            print(f"{key}: {value if value is not None else '-'}")
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace) -> int:
    """Point ``current`` at an older retained release (logged operator action)."""
    config = _config(args)
    store = Store(config.root, config.limits)
    with LockFile(config.root / "publish.lock", blocking=True):
        names = store.release_names()
        current = store.current_name()
        if args.to is not None:
            matches = [n for n in names if store.load_release(n).manifest.sequence == args.to]
        else:
            matches = [n for n in names if current is not None and n < current][-1:]
        if not matches:
            raise Error(
                "no retained release to roll back to"
                if args.to is None
                else f"no retained release with sequence {args.to}"
            )
        target = matches[-1]
        store.swap(target)
        write_public(config, store.load_release(target))
        Journal(config.journal_file).write(
            "operator-rollback", release_from=current, release_to=target, user=_user()
        )
    print(f"current -> releases/{target}")
    return EXIT_OK


def cmd_reset_sequence(args: argparse.Namespace) -> int:
    """Lower (or set) the highest accepted sequence (logged operator action)."""
    config = _config(args)
    store = Store(config.root, config.limits)
    with LockFile(config.root / "publish.lock", blocking=True):
        current = store.current()
        if current is not None and args.to < current.manifest.sequence:
            raise Error(
                f"sequence {args.to} is below the published {current.manifest.sequence}; "
                "roll back first"
            )
        state = load_state(config.state_file)
        digest = (
            current.manifest_sha256 if current and current.manifest.sequence == args.to else None
        )
        save_state(
            config.state_file,
            replace(
                state,
                highest_sequence=args.to,
                highest_manifest_sha256=digest,
                last_decided_signature=None,
            ),
        )
        Journal(config.journal_file).write(
            "operator-reset-sequence",
            sequence_from=state.highest_sequence,
            sequence_to=args.to,
            user=_user(),
        )
    print(f"highest accepted sequence: {state.highest_sequence} -> {args.to}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    """Write prep-manifest.json for DIR and its signature (the institute's side)."""
    if (args.notice_level is None) != (args.notice_text is None):
        raise ConfigError("--notice-level and --notice-text go together")
    info = sign.CutInfo(
        election=args.election,
        sequence=args.sequence,
        cut_time=args.cut_time,
        final=args.final,
        notice_level=args.notice_level,
        notice_text=args.notice_text,
        entry=args.entry,
        period_seconds=args.period,
        signed_at=args.signed_at,
    )
    data = sign.sign_folder(Path(args.dir), sign.load_key(Path(args.key)), info)
    print(f"signed sequence {args.sequence}: {len(data)} manifest bytes in {args.dir}")
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    """Sign and deliver simulated PREP cuts (the institute's side, for tests and drills)."""
    from prep_agent.institute import simulate

    return simulate.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Run agent + simulated institute on localhost (the README's first command)."""
    from prep_agent.cli import demo

    return demo.main(args)


def cmd_report(args: argparse.Namespace) -> int:
    """The post-election technical report (memoria técnica) for the institute."""
    return report.cmd_report(args)


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create the difusor's report key and print the institute's allowed_signers line."""
    from prep_agent.agent import keygen

    if args.config:
        config = _config(args)
        if config.push_key is None:
            raise ConfigError("[push] key is not set in the config: give its path there first")
        key, service_id = config.push_key, config.service_id
    elif args.key and args.service_id:
        key, service_id = Path(args.key).resolve(), args.service_id
    else:
        raise ConfigError("give --config FILE, or --key FILE and --service-id ID")
    line = keygen.create_key(key, service_id, force=args.force)
    print(f"# wrote {key} (private, 0600) and {key}.pub", file=sys.stderr)
    print("# send this line to the institute for its collector's allowed_signers:", file=sys.stderr)
    print(line)
    return EXIT_OK


def cmd_collector(args: argparse.Namespace) -> int:
    """The institute's collector of every difusor's health (or record one signed cut)."""
    from prep_agent.institute.collector import app as collector
    from prep_agent.institute.collector import config as collector_config

    if args.example:
        print(collector_config.render_collector_template("127.0.0.1:8090", Path("difusores")))
        return EXIT_OK
    if not args.config:
        raise ConfigError("--config FILE is required")
    config = collector_config.load_collector(Path(args.config))
    if args.record_cut:
        sequence = collector.Collector(config).record_cut_file(Path(args.record_cut))
        print(f"recorded signed cut {sequence}")
        return EXIT_OK
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    collector.serve(config, stop)
    return EXIT_OK


def _user() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid())


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="prep-agent",
        description="Verify and publish signed PREP result cuts (prep-cut/1) for a difusor.",
        epilog="Exit codes: 0 ok, 2 error, 3 cut rejected, 4 locked, 70 internal error.",
    )
    parser.add_argument("--version", action="version", version=f"prep-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        name: str, func: Callable[[argparse.Namespace], int], help: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def add_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", required=True, metavar="FILE", help="agent config file")

    p = add("init", cmd_init, "write a commented config file and the folder layout")
    p.add_argument("--root", required=True, metavar="DIR", help="agent-owned storage folder")
    p.add_argument("--inbox", metavar="DIR", help="drop folder (default ROOT/inbox)")
    p.add_argument(
        "--election", required=True, metavar="ID", help="election id, e.g. coah-ayun-2021"
    )
    p.add_argument(
        "--trust",
        required=True,
        metavar="ALLOWED_SIGNERS",
        help="OpenSSH allowed_signers file with the institute's keys",
    )
    p.add_argument(
        "--threshold",
        type=_positive_int,
        default=1,
        metavar="N",
        help="distinct trusted keys required (default 1)",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:8080",
        metavar="HOST:PORT",
        help="web server address (default 127.0.0.1:8080)",
    )
    p.add_argument("--config", metavar="FILE", help="config path (default ROOT/prep-agent.conf)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config file")

    p = add("run", cmd_run, "watch the drop folder and publish cuts (the daemon)")
    add_config(p)
    p.add_argument(
        "--once",
        action="store_true",
        help="process the drop folder as it is now, without waiting to settle, and exit",
    )

    p = add("verify", cmd_verify, "decide a cut without publishing it (exit 0 only if accepted)")
    add_config(p)
    p.add_argument("dir", nargs="?", metavar="DIR", help="folder holding the cut (default: inbox)")

    p = add("status", cmd_status, "show the published cut, its freshness and the last rejection")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON")

    p = add("rollback", cmd_rollback, "publish an older retained release again (logged)")
    add_config(p)
    p.add_argument(
        "--to",
        type=_positive_int,
        metavar="SEQUENCE",
        help="sequence to roll back to (default: the release before current)",
    )

    p = add(
        "reset-sequence",
        cmd_reset_sequence,
        "set the highest accepted sequence, e.g. after a leaked key (logged)",
    )
    add_config(p)
    p.add_argument("--to", type=int, required=True, metavar="N", help="new highest sequence")

    p = add("sign", cmd_sign, "write and sign prep-manifest.json for DIR (institute side)")
    p.add_argument("--key", required=True, metavar="KEY", help="OpenSSH private key (unencrypted)")
    p.add_argument("--election", required=True, metavar="ID")
    p.add_argument("--sequence", required=True, type=_positive_int, metavar="N")
    p.add_argument(
        "--cut-time",
        required=True,
        metavar="T",
        help="RFC 3339 with offset, e.g. 2021-06-06T20:30:00-05:00",
    )
    p.add_argument("--signed-at", metavar="T", help="RFC 3339 (default: now, UTC)")
    p.add_argument("--final", action="store_true", help="mark the last cut (cierre del PREP)")
    p.add_argument(
        "--notice-level",
        choices=("info", "interrupted"),
        metavar="L",
        help="notice level: info or interrupted",
    )
    p.add_argument("--notice-text", metavar="S", help="notice text (at most 500 characters)")
    p.add_argument("--entry", metavar="PATH", help="page to embed (default index.html)")
    p.add_argument("--period", type=int, metavar="SECONDS", help="period_seconds (60-3600)")
    p.add_argument("dir", metavar="DIR", help="folder of the publication tree")

    p = add("simulate", cmd_simulate, "run a simulated institute that signs and delivers PREP cuts")
    p.add_argument(
        "--key", required=True, metavar="KEY", help="institute's OpenSSH private key (unencrypted)"
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for the signed cuts (NNNNNN/)"
    )
    dest = p.add_mutually_exclusive_group(required=True)
    dest.add_argument("--inbox", metavar="DIR", help="deliver by copying into this drop folder")
    dest.add_argument(
        "--sftp", metavar="USER@HOST:DIR", help="deliver with the OpenSSH sftp client"
    )
    p.add_argument("--identity", metavar="FILE", help="ssh identity file for --sftp")
    p.add_argument("--port", type=_positive_int, metavar="N", help="ssh port for --sftp")
    p.add_argument(
        "--interval",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="seconds between cuts (default 600)",
    )
    p.add_argument(
        "--cuts", type=int, default=0, metavar="N", help="stop after N cuts (default: until Ctrl-C)"
    )
    p.add_argument("--final", action="store_true", help="make the last of --cuts the final cut")
    p.add_argument(
        "--seed", type=int, default=2021, metavar="N", help="simulation seed (default 2021)"
    )

    p = add("report", cmd_report, "write the memoria técnica (access logs + journal)")
    report.add_arguments(p)

    p = add("keygen", cmd_keygen, "create the difusor's health report key (ed25519)")
    p.add_argument("--config", metavar="FILE", help="agent config: uses [push] key and service_id")
    p.add_argument("--key", metavar="FILE", help="private key file to create (without --config)")
    p.add_argument("--service-id", metavar="ID", help="the difusor's serviceId (without --config)")
    p.add_argument("--force", action="store_true", help="replace an existing key")

    p = add("collector", cmd_collector, "the institute's collector and dashboard of difusores")
    p.add_argument("--config", metavar="FILE", help="collector config file")
    p.add_argument(
        "--record-cut",
        metavar="MANIFEST",
        help="record a signed prep-manifest.json (or its folder) as the latest cut, and exit",
    )
    p.add_argument("--example", action="store_true", help="print a commented config and exit")

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
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except Error as exc:
        print(f"prep-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_ERROR
    except Exception as exc:
        fd, path = tempfile.mkstemp(prefix="prep-agent-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            traceback.print_exc(file=fh)
        log.debug("unexpected error", exc_info=True)
        print(f"prep-agent: unexpected error: {exc!r} (traceback in {path})", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
