"""The ``prep-agent`` command line: the parser and ``main(argv) -> exit status``.

Exit codes: 0 success; 2 usage, configuration or environment error; 3 the cut
is (or would be) rejected; 4 another agent holds the lock; 70 unexpected error
(traceback in the log file named on stderr).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Callable

from prep_agent import __version__
from prep_agent.cli import demo, difusor, institute, rehearse
from prep_agent.core.errors import EXIT_ERROR, EXIT_INTERNAL, Error

log = logging.getLogger("prep_agent")


REPORT_PACKAGE = "prep-agent-report"
"""The package (.deb and .rpm) that holds ``prep_agent.report``, the memoria técnica."""


def report_module() -> ModuleType | None:
    """``prep_agent.report.generate``, or None when the report package is not installed.

    Raises ModuleNotFoundError if the report is there but one of its own imports is not.
    """
    try:
        from prep_agent.report import generate
    except ModuleNotFoundError as exc:
        if exc.name in ("prep_agent.report", "prep_agent.report.generate"):
            return None
        raise
    return generate


def cmd_report(args: argparse.Namespace) -> int:
    """The post-election technical report (memoria técnica) for the institute.

    Raises Error naming the package to install when the report is not installed.
    """
    generate = report_module()
    if generate is None:
        raise Error(
            f"the memoria técnica is in the package {REPORT_PACKAGE}: "
            f"apt install {REPORT_PACKAGE} (EL9: dnf install {REPORT_PACKAGE})"
        )
    return int(generate.cmd_report(args))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="prep-agent",
        description="Verify and publish signed PREP result cuts (prep-cut/1) for a difusor.",
        epilog=(
            "Exit codes: 0 ok, 2 error, 3 cut rejected, 4 locked, 5 undelivered, "
            "6 audit: copy altered, 7 audit: copy stale, 8 audit: difusor unreachable, "
            "9 rehearsal failed, 70 internal error."
        ),
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

    difusor.add_commands(add)
    institute.add_commands(add)
    generate = report_module()
    if generate is not None:
        generate.add_arguments(
            add("report", cmd_report, "write the memoria técnica (access logs + journal)")
        )
    else:
        p = add("report", cmd_report, f"write the memoria técnica (package {REPORT_PACKAGE})")
        p.set_defaults(any_arguments=True)
    demo.add_commands(add)
    rehearse.add_commands(add)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
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
