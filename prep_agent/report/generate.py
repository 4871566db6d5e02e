"""``prep-agent report``: the memoria técnica the convocatoria asks of every difusor.

Reads the web server's access logs and the agent's journal and writes, in
``--out``: ``memoria-tecnica.html`` (Spanish, self-contained, print-ready),
``summary.json``, one CSV per table, optionally ``memoria-tecnica.pdf``
(``--pdf``, headless Chromium) and ``bitacoras.tar`` (``--archive``: the raw
logs holding lines of the operation window, with their SHA-256 list), and
``SHA256SUMS`` of everything written. Definitions: ``report_traffic``,
``report_incidents`` and ``report_summary.DEFINITIONS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

from prep_agent.agent.journal import read_journal
from prep_agent.core.errors import EXIT_OK, ConfigError
from prep_agent.report.bundle import render_pdf, write_archive, write_checksums
from prep_agent.report.edge import edge_doc, parse_offset, read_edge
from prep_agent.report.incidents import Incidents, read_incidents
from prep_agent.report.render import render_html, write_csvs, write_summary
from prep_agent.report.summary import Options, build_summary
from prep_agent.report.traffic import Windows, count_traffic

log = logging.getLogger(__name__)

HTML_NAME = "memoria-tecnica.html"
"""The report page in ``--out``."""
PDF_NAME = "memoria-tecnica.pdf"
"""The printed report in ``--out`` (``--pdf``)."""
ARCHIVE_NAME = "bitacoras.tar"
"""The raw logs of the operation days (``--archive``)."""


@dataclass(frozen=True)
class ReportJob:
    """Everything ``make_report`` needs (the parsed command line)."""

    logs: list[Path]
    journal: Path | None
    options: Options
    out: Path
    pdf: bool = False
    archive: bool = False
    comments: str = ""
    jobs: int | None = None
    progress: bool = False
    error_logs: tuple[Path, ...] = ()
    fail2ban_logs: tuple[Path, ...] = ()
    log_offset: str = "+00:00"


class Progress:
    """A one-line progress display on stderr: share read, lines, lines/s, time left."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()

    def __call__(self, done: int, total: int, lines: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = lines / elapsed
        left = elapsed * (total - done) / done if done else 0.0
        pct = 100 * done / total if total else 100.0
        self.stream.write(
            f"\rreading logs: {pct:5.1f}%  {done / 2**20:,.0f}/{total / 2**20:,.0f} MiB  "
            f"{lines:,} lines  {rate:,.0f} lines/s  ~{left:.0f} s left "
        )
        self.stream.flush()

    def finish(self) -> None:
        """End the progress line."""
        self.stream.write("\n")
        self.stream.flush()


def parse_instant(text: str) -> datetime:
    """An RFC 3339 time with its UTC offset. Raises ConfigError otherwise."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r} is not an RFC 3339 time") from None
    if t.tzinfo is None:
        raise ConfigError(f"{text!r} has no UTC offset (e.g. 2021-06-06T00:00:00-05:00)")
    return t


def _epoch_window(window: tuple[datetime, datetime]) -> tuple[int, int]:
    return (int(window[0].timestamp()), int(window[1].timestamp()))


def make_report(req: ReportJob) -> list[str]:
    """Write the report into ``req.out``; return the names of the files written.

    Raises ConfigError for bad inputs, Error if the PDF cannot be printed, and
    OSError if a file cannot be read or written.
    """
    opts = req.options
    for name, (start, end) in (("operation", opts.operation), ("baseline", opts.baseline)):
        if start >= end:
            raise ConfigError(f"the {name} window ends before it starts")
    missing = [str(p) for p in req.logs if not p.is_file()]
    if missing:
        raise ConfigError(f"access log not found: {', '.join(missing)}")
    if req.journal is not None and not req.journal.is_file():
        raise ConfigError(f"journal not found: {req.journal}")
    missing = [str(p) for p in (*req.error_logs, *req.fail2ban_logs) if not p.is_file()]
    if missing:
        raise ConfigError(f"log not found: {', '.join(missing)}")
    try:
        log_tz = parse_offset(req.log_offset)
    except ValueError as exc:
        raise ConfigError(f"--log-offset: {exc}") from None
    req.out.mkdir(parents=True, exist_ok=True)
    offset = opts.tz.utcoffset(None)
    windows = Windows(
        _epoch_window(opts.baseline),
        _epoch_window(opts.operation),
        int(offset.total_seconds()) if offset else 0,
    )
    progress = Progress() if req.progress else None
    started = time.monotonic()
    traffic = count_traffic(req.logs, windows, workers=req.jobs, progress=progress)
    if progress is not None:
        progress.finish()
    log.info(
        "read %d lines (%d garbage) in %.1f s",
        traffic.lines,
        traffic.garbage,
        time.monotonic() - started,
    )
    incidents: Incidents | None = None
    if req.journal is not None:
        incidents = read_incidents(
            read_journal(req.journal), opts.operation, opts.period_seconds, opts.stale_periods
        )
    doc = build_summary(traffic, incidents, opts, [str(p) for p in req.logs])
    if req.error_logs or req.fail2ban_logs:
        edge = read_edge(req.error_logs, req.fail2ban_logs, opts.operation, log_tz, opts.tz)
        doc["edge"] = edge_doc(edge, opts.tz)
        doc["input"]["edge_files"] = [str(p) for p in (*req.error_logs, *req.fail2ban_logs)]
    names = write_csvs(doc, req.out)
    write_summary(doc, req.out)
    generated = datetime.now(timezone.utc).astimezone(opts.tz).strftime("%d/%m/%Y %H:%M")
    (req.out / HTML_NAME).write_text(render_html(doc, req.comments, generated), encoding="utf-8")
    names += ["summary.json", HTML_NAME]
    if req.pdf:
        render_pdf(req.out / HTML_NAME, req.out / PDF_NAME)
        names.append(PDF_NAME)
    if req.archive:
        chosen = [p for i, p in enumerate(req.logs) if i in traffic.files_with_operation]
        write_archive(chosen, req.out / ARCHIVE_NAME)
        names.append(ARCHIVE_NAME)
    write_checksums(req.out, names)
    return [*names, "SHA256SUMS"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``report`` subcommand's arguments."""
    p.add_argument(
        "--access-log",
        required=True,
        nargs="+",
        metavar="FILE",
        help="access logs (combined format and variants; plain or .gz; rotated sets)",
    )
    p.add_argument("--journal", metavar="FILE", help="the agent's journal.jsonl")
    p.add_argument(
        "--error-log",
        nargs="+",
        default=[],
        metavar="FILE",
        help="nginx error logs of the site: rate-limited and firewall-blocked requests",
    )
    p.add_argument(
        "--fail2ban-log", nargs="+", default=[], metavar="FILE", help="fail2ban logs: bans"
    )
    p.add_argument(
        "--log-offset",
        default="+00:00",
        metavar="OFFSET",
        help="UTC offset of the times in those logs (default +00:00)",
    )
    p.add_argument(
        "--from",
        dest="from_",
        required=True,
        metavar="T",
        help="start of the PREP operation, RFC 3339 (its offset sets the report's days)",
    )
    p.add_argument("--to", required=True, metavar="T", help="end of the PREP operation")
    p.add_argument(
        "--baseline-from", required=True, metavar="T", help="start of the usual-traffic window"
    )
    p.add_argument("--baseline-to", required=True, metavar="T", help="end of that window")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the report")
    p.add_argument("--pdf", action="store_true", help="also print the report to PDF (Chromium)")
    p.add_argument(
        "--archive", action="store_true", help="bundle the operation days' raw logs + SHA-256"
    )
    p.add_argument("--comments", metavar="FILE", help="text for the comments section")
    p.add_argument(
        "--period",
        type=int,
        default=600,
        metavar="SECONDS",
        help="cut period when the journal does not say (default 600)",
    )
    p.add_argument(
        "--stale-periods",
        type=int,
        default=3,
        metavar="N",
        help="periods without a cut before it is stale (default 3)",
    )
    p.add_argument("--jobs", type=int, metavar="N", help="worker processes (default: CPUs)")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress on stderr (default: when stderr is a terminal)",
    )


def cmd_report(args: argparse.Namespace) -> int:
    """Write the memoria técnica (see the module docstring)."""
    if args.period < 1 or args.stale_periods < 1:
        raise ConfigError("--period and --stale-periods must be at least 1")
    comments = ""
    if args.comments:
        try:
            comments = Path(args.comments).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read {args.comments}: {exc.strerror}") from exc
    req = ReportJob(
        logs=[Path(p) for p in args.access_log],
        journal=Path(args.journal) if args.journal else None,
        options=Options(
            baseline=(parse_instant(args.baseline_from), parse_instant(args.baseline_to)),
            operation=(parse_instant(args.from_), parse_instant(args.to)),
            period_seconds=args.period,
            stale_periods=args.stale_periods,
        ),
        out=Path(args.out),
        pdf=args.pdf,
        archive=args.archive,
        comments=comments,
        jobs=args.jobs,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        error_logs=tuple(Path(p) for p in args.error_log),
        fail2ban_logs=tuple(Path(p) for p in args.fail2ban_log),
        log_offset=args.log_offset,
    )
    names = make_report(req)
    print(f"wrote {len(names)} files in {req.out}: {HTML_NAME}, summary.json, ...")
    return EXIT_OK
