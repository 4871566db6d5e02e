"""``prep-agent rehearse``: one election night with faults, and its verdict."""

from __future__ import annotations

import argparse
from pathlib import Path

from prep_agent.cli.options import AddCommand, positive_int
from prep_agent.core.errors import EXIT_OK, ConfigError
from prep_agent.rehearsal import report
from prep_agent.rehearsal.night import Options, rehearse

EXIT_FAILED = 9
"""The rehearsal ran and its verdict is ``fail``."""
MAX_READERS = 50
"""Most simulated frames per difusor: they all come from this machine's one address,
and an agent takes at most 64 open connections per client address (the viewer's and
Chromium's among them)."""


def cmd_rehearse(args: argparse.Namespace) -> int:
    """Run the rehearsal, write its report; exit 0 only on a passing verdict.

    Raises ConfigError for a period out of range, Error when the stand cannot be built.
    """
    if not 0.5 <= args.period <= 600:
        raise ConfigError("--period must be between 0.5 and 600 seconds")
    if not 0 <= args.readers <= MAX_READERS:
        raise ConfigError(f"--readers must be between 0 and {MAX_READERS}")
    faults = Path(args.faults) if args.faults else None
    options = Options(
        Path(args.out), args.cuts, args.period, faults, args.browser, args.mode, args.readers
    )
    doc = report.build(rehearse(options))
    report.write(options.out, doc)
    where = options.out / "rehearsal.html"
    print(f"rehearsal: {doc['verdict']} ({len(doc['problems'])} problems): {where}")
    for problem in doc["problems"]:
        print(f"  {problem}")
    return EXIT_OK if doc["verdict"] == "pass" else EXIT_FAILED


def add_commands(add: AddCommand) -> None:
    """Register ``rehearse``."""
    p = add("rehearse", cmd_rehearse, "rehearse a whole election night with faults")
    p.add_argument("--out", required=True, metavar="DIR", help="empty folder for everything")
    p.add_argument("--cuts", type=positive_int, default=8, help="cuts of the night (default 8)")
    p.add_argument("--period", type=float, default=2.0, help="seconds between cuts (default 2)")
    p.add_argument("--faults", metavar="FILE", help="fault schedule (default: every kind once)")
    p.add_argument(
        "--browser",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also watch the frames in headless Chromium (needs selenium; default: yes)",
    )
    p.add_argument(
        "--readers",
        type=int,
        default=25,
        metavar="N",
        help="simulated frames polling each difusor's status.json over HTTP, each on its "
        f"own keep-alive connection (0 to {MAX_READERS}; 0: no load; default 25)",
    )
    p.add_argument(
        "--mode",
        choices=("auto", "loopback", "netns"),
        default="auto",
        help="difusores on loopback ports or each in a network namespace (root); "
        "default auto: namespaces when root",
    )
