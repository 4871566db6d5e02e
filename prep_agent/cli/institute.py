"""The institute's commands: sign, distribute, simulate, collector, audit."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from types import FrameType

from prep_agent.cli.options import AddCommand, positive_int
from prep_agent.core.errors import EXIT_OK, ConfigError
from prep_agent.institute import sign


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
    from prep_agent.institute.simulation import run

    return run.main(args)


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


def cmd_distribute(args: argparse.Namespace) -> int:
    """Check a cut locally and deliver it to every difusor (or follow a folder of cuts)."""
    from prep_agent.institute.collector import config as collector_config
    from prep_agent.institute.distribution import command

    if (args.cut is None) == (args.watch is None):
        raise ConfigError("give either CUT_DIR or --watch DIR")
    if args.watch is not None and (args.key or args.agent):
        raise ConfigError("--key and --agent sign one CUT_DIR; --watch sends signed cuts")
    options = command.Options(
        cut=Path(args.cut) if args.cut else None,
        watch=Path(args.watch) if args.watch else None,
        keys=command.key_paths(args.key),
        agent_keys=command.key_paths(args.agent),
        dry_run=args.dry_run,
        confirm=not args.no_confirm,
    )
    config = collector_config.load_collector(Path(args.config))
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return command.main(config, options, stop)


def cmd_audit(args: argparse.Namespace) -> int:
    """Audit a difusor's public copy against the institute's signed cut.

    Raises ``ConfigError`` for an unreadable trust file or a bad URL.
    """
    import json
    from datetime import datetime, timezone

    from prep_agent.core.allowed_signers import parse_allowed_signers
    from prep_agent.core.errors import (
        EXIT_AUDIT_ALTERED,
        EXIT_AUDIT_STALE,
        EXIT_AUDIT_UNREACHABLE,
        SignatureFormatError,
    )
    from prep_agent.institute.audit import check

    try:
        signers = parse_allowed_signers(Path(args.trust).read_text(encoding="utf-8"))
    except (OSError, UnicodeError, SignatureFormatError) as exc:
        raise ConfigError(f"cannot read --trust {args.trust}: {exc}") from None
    options = check.AuditOptions(
        signers=tuple(signers),
        threshold=args.threshold,
        election=args.election,
        sample=None if args.all else args.sample,
        expect_sequence=args.expect_sequence,
        timeout=args.timeout,
        concurrency=args.concurrency,
    )
    report = check.audit(args.url, options, datetime.now(timezone.utc))
    if args.json:
        print(json.dumps(report.to_json(), ensure_ascii=False, indent=1))
    else:
        for finding in report.findings:
            print(finding.line())
        print(
            f"{report.verdict}: sequence {report.sequence}, {report.checked}/{report.listed} "
            f"files checked, {len(report.findings)} findings, {report.seconds:.1f} s"
        )
    codes = {
        check.ALTERED: EXIT_AUDIT_ALTERED,
        check.STALE: EXIT_AUDIT_STALE,
        check.UNREACHABLE: EXIT_AUDIT_UNREACHABLE,
    }
    return codes.get(report.verdict, EXIT_OK)


def add_commands(add: AddCommand) -> None:
    """Register these commands with the parser's ``add`` function."""
    p = add("sign", cmd_sign, "write and sign prep-manifest.json for DIR (institute side)")
    p.add_argument("--key", required=True, metavar="KEY", help="OpenSSH private key (unencrypted)")
    p.add_argument("--election", required=True, metavar="ID")
    p.add_argument("--sequence", required=True, type=positive_int, metavar="N")
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

    p = add(
        "distribute",
        cmd_distribute,
        "check a signed cut and deliver it to every difusor by sftp (institute side)",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="institute (collector) config")
    p.add_argument("--watch", metavar="DIR", help="distribute each new cut subfolder of DIR")
    p.add_argument(
        "--key", action="append", metavar="KEY", help="sign CUT_DIR's manifest with this key here"
    )
    p.add_argument(
        "--agent",
        action="append",
        metavar="PUBKEY",
        help="sign CUT_DIR's manifest with the ssh-agent key of this public key",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be sent where")
    p.add_argument(
        "--no-confirm", action="store_true", help="do not wait for each difusor's status.json"
    )
    p.add_argument("cut", nargs="?", metavar="CUT_DIR", help="a cut folder (manifest + signature)")

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
    dest.add_argument(
        "--serve-https",
        metavar="HOST:PORT",
        help="publish each cut as a PREP package zip (signed, namespace prep-package) in "
        "OUT/paquetes/ and serve it over HTTPS with a test CA made in OUT/tls/ (difusores "
        "poll https://HOST:PORT/paquetes/ with [source] type = https-package)",
    )
    p.add_argument("--identity", metavar="FILE", help="ssh identity file for --sftp")
    p.add_argument("--port", type=positive_int, metavar="N", help="ssh port for --sftp")
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
        "--age",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="sign each cut with a cut time this many seconds old, to the second (a compressed "
        "night: the interruption notice comes due sooner; default 0, the minute of the clock)",
    )
    p.add_argument(
        "--keep-serving",
        action="store_true",
        help="with --serve-https and --cuts: keep serving after the last cut until Ctrl-C",
    )
    p.add_argument(
        "--seed", type=int, default=2021, metavar="N", help="simulation seed (default 2021)"
    )

    p = add("collector", cmd_collector, "the institute's collector and dashboard of difusores")
    p.add_argument("--config", metavar="FILE", help="collector config file")
    p.add_argument(
        "--record-cut",
        metavar="MANIFEST",
        help="record a signed prep-manifest.json (or its folder) as the latest cut, and exit",
    )
    p.add_argument("--example", action="store_true", help="print a commented config and exit")

    p = add(
        "audit", cmd_audit, "check that a difusor serves the institute's signed cut, byte for byte"
    )
    p.add_argument("url", metavar="URL", help="the difusor's public address (its frame)")
    p.add_argument(
        "--trust", required=True, metavar="ALLOWED_SIGNERS", help="the institute's allowed_signers"
    )
    p.add_argument("--threshold", type=positive_int, default=1, metavar="N", help="keys required")
    p.add_argument("--election", metavar="ID", help="the election the cut must be of")
    files = p.add_mutually_exclusive_group()
    files.add_argument(
        "--sample",
        type=positive_int,
        metavar="N",
        help="N random files plus the entry page and every CSV and zip",
    )
    files.add_argument("--all", action="store_true", help="every listed file (the default)")
    p.add_argument(
        "--expect-sequence", type=positive_int, metavar="N", help="the newest sequence known"
    )
    p.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="per request (default 10)"
    )
    p.add_argument(
        "--concurrency", type=positive_int, default=8, metavar="N", help="parallel GETs (default 8)"
    )
    p.add_argument("--json", action="store_true", help="the report as JSON")
