"""``prep-agent collector``: the institute's view of every difusor (health-v1 §3).

It receives the difusores' signed pushes (``POST /reports``), polls each
registered difusor's ``/health`` concurrently, learns the latest cut the
institute signed from its outgoing manifests, keeps everything in SQLite
(``collector_store``) and serves the Spanish dashboard, a JSON API and a CSV
export of the same rows (``collector_board``).
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from flask import Flask, Response, abort, render_template_string, request

from prep_agent.core.allowed_signers import AllowedSigner, parse_allowed_signers
from prep_agent.core.csvcell import csv_safe
from prep_agent.core.cuttime import format_cut_time
from prep_agent.core.errors import ConfigError, Error, Rejection, SignatureFormatError
from prep_agent.core.manifest import MANIFEST_NAME, Limits, parse_manifest, parse_rfc3339
from prep_agent.core.protocol import SIGNATURE_HEADER
from prep_agent.institute.collector.audits import AuditLog, Auditor, copy_summary
from prep_agent.institute.collector.board import LABELS, Board, make_board
from prep_agent.institute.collector.config import CollectorConfig
from prep_agent.institute.collector.deliveries import DeliveryLog, target_summary
from prep_agent.institute.collector.poll import CONNECTION_FAILED, TIMEOUT, get_health
from prep_agent.institute.collector.standing import standing_html, standing_json
from prep_agent.institute.collector.store import CollectorDatabase
from prep_agent.institute.collector.verify import (
    MAX_REPORT_BYTES,
    REPLAY,
    REPORT_INVALID,
    SIGNATURE_MALFORMED,
    SIGNATURE_MISSING,
    SIGNATURE_UNTRUSTED,
    TIME_WINDOW,
    TOO_LARGE,
    UNKNOWN_DIFUSOR,
    Report,
    ReportRejected,
    check_report,
    parse_document,
)
from prep_agent.shared.httpserver import Server, ServerLimits, loopback_for, parse_listen

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

TICK = 1.0
"""Seconds between looks at the manifests folder (polls go every ``poll_interval``)."""
REASON_TEXT = {
    SIGNATURE_MISSING: "sin firma",
    SIGNATURE_MALFORMED: "firma mal formada",
    REPORT_INVALID: "reporte inválido",
    UNKNOWN_DIFUSOR: "difusor no registrado",
    SIGNATURE_UNTRUSTED: "firma no válida (falsificado)",
    TIME_WINDOW: "hora fuera de ±300 s",
    REPLAY: "repetido (replay)",
    TOO_LARGE: "demasiado grande",
}
"""Dashboard text of each rejection reason."""
POLL_ERROR_TEXT = {TIMEOUT: "sin respuesta a tiempo", CONNECTION_FAILED: "no se pudo conectar"}
"""Dashboard text of the usual poll failures (others are shown as recorded)."""
_HTTP_CODE = {TOO_LARGE: 413, REPORT_INVALID: 400, REPLAY: 409, TIME_WINDOW: 422}
CSV_COLUMNS = (
    "service_id",
    "name",
    "state",
    "label",
    "status",
    "sequence",
    "cut_time",
    "latest_sequence",
    "behind",
    "cut_age",
    "last_report",
    "last_report_age",
    "source",
    "failing_since",
    "failing_for",
    "unlink",
    "output",
    "poll_error",
    "copy",
    "copy_detail",
)
"""Columns of ``/difusores.csv`` (the JSON rows' keys)."""


def utc_now() -> datetime:
    """The collector's clock (UTC, aware)."""
    return datetime.now(timezone.utc)


def load_trust(path: Path) -> list[AllowedSigner]:
    """The difusores' allowed_signers. Raises ``ConfigError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read allowed_signers {path}: {exc.strerror}") from None
    try:
        return parse_allowed_signers(text)
    except SignatureFormatError as exc:
        raise ConfigError(f"allowed_signers {path}: {exc}") from None


def literal_principals(signers: list[AllowedSigner]) -> list[str]:
    """Principals without wildcards: each one is a registered difusor."""
    found = [p for s in signers for p in s.principals if not re.search(r"[*?!,]", p)]
    return list(dict.fromkeys(found))


def spanish_duration(seconds: float | None) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``; ``—`` for None."""
    if seconds is None:
        return "—"
    s = int(max(0, seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class Collector:
    """Trust, store, manifests and polling: everything but HTTP serving."""

    def __init__(self, config: CollectorConfig, clock: Clock = utc_now) -> None:
        self.config = config
        self.clock = clock
        self.store = CollectorDatabase(config.database, config.history_rows)
        self.deliveries = DeliveryLog(config.database)
        self.audits = AuditLog(config.database)
        self.names = {d.service_id: d.name for d in config.difusores}
        self.entries = {d.service_id: d for d in config.difusores}
        self.signers: list[AllowedSigner] = []
        self.registered: set[str] = set()
        self._trust_stamp: tuple[int, int, int] | None = None
        self._bad_manifests: set[str] = set()
        self._top_stamp: tuple[int, int] | None = None
        self.refresh_trust()

    def refresh_trust(self) -> None:
        """(Re)load allowed_signers when it changed; register every difusor it names."""
        try:
            st = os.stat(self.config.trust)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        if stamp == self._trust_stamp and self.signers:
            return
        try:
            signers = load_trust(self.config.trust)
        except ConfigError:
            if not self.signers:
                raise
            log.error("allowed_signers no longer parses; keeping the previous trust")
            return
        self._trust_stamp = stamp
        self.signers = signers
        self.registered = set(self.names) | set(literal_principals(signers))
        self.store.register(sorted(self.registered), self.clock())

    def receive(self, body: bytes, header: str | None, sender: str = "") -> Report:
        """Accept one pushed report or raise ``ReportRejected`` (counted).

        A refusal is counted under the difusor only if its signature verified;
        otherwise under ``sender`` (the client's address), whatever the body claims.
        """
        now = self.clock()
        try:
            return self.store.accept_push(
                _claimed_id(body) or "",
                lambda last: check_report(
                    body,
                    header,
                    self.signers,
                    self.registered,
                    last,
                    now,
                    self.config.max_skew,
                ),
                now,
            )
        except ReportRejected as exc:
            sid = exc.service_id if exc.service_id in self.registered else None
            if sid:
                self.store.count_rejection(exc.reason, sid, exc.detail, now)
            else:
                self.store.count_rejection(exc.reason, "", exc.detail, now, sender=sender)
            raise

    def board(self) -> Board:
        """The dashboard rows now."""
        return make_board(
            self.store.difusores(),
            self.names,
            self.store.signed_cuts(),
            self.clock(),
            self.config.silent_after,
            self.config.unlink_periods,
            self.config.period_seconds,
            {sid: target_summary(r) for sid, r in self.deliveries.targets().items()},
            {sid: e.contact for sid, e in self.entries.items()},
            {sid: copy_summary(r) for sid, r in self.audits.latest().items()},
        )

    def record_cut_file(self, path: Path) -> int:
        """Record a signed manifest (a file, or a folder holding one); return its sequence.

        Raises ``Error`` if it does not parse.
        """
        target = path / MANIFEST_NAME if path.is_dir() else path
        try:
            manifest = parse_manifest(target.read_bytes(), Limits())
        except OSError as exc:
            raise Error(f"cannot read {target}: {exc.strerror}") from None
        except Rejection as exc:
            raise Error(f"{target} is not a manifest: {exc.detail}") from None
        self.store.record_cut(manifest, self.clock())
        return manifest.sequence

    def scan_manifests(self) -> None:
        """Record the cuts of the manifests folder not yet known (``NNNNNN/`` folders,
        and a ``prep-manifest.json`` directly in it)."""
        folder = self.config.manifests
        if folder is None:
            return
        try:
            names = os.listdir(folder)
        except OSError as exc:
            log.warning("cannot read manifests folder %s: %s", folder, exc.strerror)
            return
        known = self.store.known_sequences()
        for name in names:
            if re.fullmatch(r"\d{1,12}", name) and int(name) not in known:
                self._record_quietly(folder / name / MANIFEST_NAME, name)
        top = folder / MANIFEST_NAME
        try:
            st = os.stat(top)
        except OSError:
            return
        if (st.st_ino, st.st_mtime_ns) != self._top_stamp:
            self._top_stamp = (st.st_ino, st.st_mtime_ns)
            self._record_quietly(top, MANIFEST_NAME)

    def _record_quietly(self, path: Path, name: str) -> None:
        try:
            self.record_cut_file(path)
        except Error as exc:
            if name not in self._bad_manifests:
                self._bad_manifests.add(name)
                log.warning("manifest %s not recorded: %s", path, exc)

    def poll_one(self, service_id: str, url: str, token: str | None) -> None:
        """GET one difusor's /health and record the document (or the error).

        The body may hold at most ``MAX_REPORT_BYTES`` (as a pushed report) and the
        whole poll ends within ``connect_timeout + read_timeout`` seconds.
        """
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        c = self.config
        try:
            status, body = get_health(
                url, headers, c.connect_timeout, c.read_timeout, MAX_REPORT_BYTES
            )
            if status not in (200, 503):
                raise Error(f"HTTP {status}")
            report = parse_document(body)
            if report.service_id != service_id:
                raise Error(f"serviceId {report.service_id[:64]!r} is not {service_id!r}")
        except Error as exc:
            self.store.record_poll_error(service_id, str(exc), self.clock())
            return
        self.store.record_poll(service_id, report.doc, self.clock())


def _claimed_id(body: bytes) -> str | None:
    """``serviceId`` as the body claims it (for the replay lookup; checked later)."""
    try:
        doc = json.loads(body) if len(body) <= MAX_REPORT_BYTES else None
    except (ValueError, RecursionError):
        return None
    sid = doc.get("serviceId") if isinstance(doc, dict) else None
    return sid if isinstance(sid, str) else None


class Poller:
    """Background thread: manifests every ``TICK``, polls every ``poll_interval``."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector
        self.stop_event = threading.Event()
        targets = [d for d in collector.config.difusores if d.health_url]
        self.targets = targets
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(32, len(targets))))
        self.inflight: dict[str, Future[None]] = {}
        self.thread = threading.Thread(target=self.loop, name="collector-poller", daemon=True)
        self.auditor: Auditor | None = None
        settings = collector.config.audit
        if settings.enabled and settings.signers is not None:
            trust = settings.signers
            load_trust(trust)  # refuse to start on an unreadable file; re-read per audit
            self.auditor = Auditor(
                settings,
                collector.config.difusores,
                lambda: tuple(load_trust(trust)),
                collector.audits,
                collector.config.poll_interval,
                collector.clock,
            )

    def loop(self) -> None:
        c = self.collector
        next_poll = 0.0
        while not self.stop_event.is_set():
            try:
                c.refresh_trust()
                c.scan_manifests()
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + c.config.poll_interval
                    self.poll_all()
                if self.auditor is not None:
                    self.auditor.tick(c.board())
            except Exception:  # keep the collector alive; the dashboard shows staleness
                log.error("collector tick failed", exc_info=True)
            self.stop_event.wait(TICK)

    def poll_all(self) -> None:
        """Start one poll per difusor, concurrently; skip those still in flight."""
        for d in self.targets:
            running = self.inflight.get(d.service_id)
            if running is not None and not running.done():
                continue
            assert d.health_url is not None
            self.inflight[d.service_id] = self.pool.submit(
                self.collector.poll_one, d.service_id, d.health_url, d.token
            )

    def start(self) -> None:
        """Start the thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop the thread and the poll workers (a poll in flight ends by its deadline)."""
        self.stop_event.set()
        self.thread.join(timeout=5)
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.auditor is not None:
            self.auditor.stop()


def _cut_text(text: str) -> str:
    """``06/06/2021 20:30 h (UTC-6)``, or the text as sent if it does not parse."""
    try:
        return format_cut_time(text, parse_rfc3339(text, "cut_time"))
    except Rejection:
        return text


def _template(name: str) -> str:
    return (resources.files("prep_agent.institute.collector") / "static" / name).read_text(
        encoding="utf-8"
    )


def board_json(board: Board, rejections: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON API document: the dashboard's data."""
    latest = board.latest
    return {
        "time": board.now.isoformat(timespec="seconds"),
        "latest_cut": None
        if latest is None
        else {
            "sequence": latest.sequence,
            "cut_time": latest.cut_time,
            "signed_at": latest.signed_at,
            "period_seconds": latest.period_seconds,
            "final": latest.final,
        },
        "period_seconds": board.period_seconds,
        "unlink_after": board.unlink_after,
        "silent_after": board.silent_after,
        "counts": board.counts(),
        "difusores": [row.as_dict() for row in board.rows],
        "rejections": rejections,
    }


def board_csv(board: Board) -> str:
    """The rows as CSV (UTF-8, header line, RFC 4180 quoting); text that could run as a
    spreadsheet formula is prefixed with ``'`` (``csv_safe``)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in board.rows:
        values = row.as_dict()
        writer.writerow([csv_safe("" if values[c] is None else values[c]) for c in CSV_COLUMNS])
    return out.getvalue()


def create_collector_app(collector: Collector) -> Flask:
    """The Flask application: POST /reports (open), dashboard, API and CSV (allow-list)."""
    app = Flask("prep_agent.institute.collector.app")
    config = collector.config
    networks = [ipaddress.ip_network(n, strict=False) for n in config.dashboard_allow]
    page = _template("collector.html")
    css = _template("collector.css")

    def allowed() -> None:
        try:
            client = ipaddress.ip_address(request.remote_addr or "")
        except ValueError:
            abort(403)
        if not any(client in net for net in networks):
            abort(403)

    def reply(body: str, mimetype: str, status: int = 200) -> Response:
        response = Response(body, status=status, mimetype=mimetype)
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @app.post("/reports")
    def reports() -> Response:
        length = request.content_length
        sender = request.remote_addr or "?"
        if length is not None and length > MAX_REPORT_BYTES:
            now = collector.clock()
            collector.store.count_rejection(TOO_LARGE, "", f"{length} bytes", now, sender=sender)
            doc = {"accepted": False, "reason": TOO_LARGE}
            return reply(json.dumps(doc), "application/json", 413)
        body = request.stream.read(MAX_REPORT_BYTES + 1)
        try:
            report = collector.receive(body, request.headers.get(SIGNATURE_HEADER), sender)
        except ReportRejected as exc:
            code = _HTTP_CODE.get(exc.reason, 403)
            doc = {"accepted": False, "reason": exc.reason, "detail": exc.detail}
            return reply(json.dumps(doc), "application/json", code)
        doc = {"accepted": True, "serviceId": report.service_id}
        return reply(json.dumps(doc), "application/json", 202)

    @app.get("/")
    def dashboard() -> Response:
        allowed()
        board = collector.board()
        html = render_template_string(
            page,
            board=board,
            counts=board.counts(),
            labels=LABELS,
            latest_text=_cut_text(board.latest.cut_time) if board.latest else None,
            rejections=collector.store.rejections(),
            reasons=REASON_TEXT,
            poll_errors=POLL_ERROR_TEXT,
            refresh=config.refresh_seconds,
            duration=spanish_duration,
            now_ts=board.now.timestamp(),
        )
        response = reply(html, "text/html")
        response.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; img-src 'self'; frame-ancestors 'none'; "
            "base-uri 'none'; form-action 'none'"
        )
        return response

    @app.get("/collector.css")
    def stylesheet() -> Response:
        return reply(css, "text/css")

    @app.get("/api/difusores")
    def api() -> Response:
        allowed()
        doc = board_json(collector.board(), collector.store.rejections())
        return reply(json.dumps(doc, ensure_ascii=False), "application/json")

    @app.get("/difusores.csv")
    def export() -> Response:
        allowed()
        response = reply(board_csv(collector.board()), "text/csv")
        response.headers["Content-Disposition"] = 'attachment; filename="difusores.csv"'
        return response

    @app.get("/difusores-vigentes.json")
    def standing() -> Response:
        doc = standing_json(collector.board(), collector.entries)
        response = reply(json.dumps(doc, ensure_ascii=False), "application/json")
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    @app.get("/difusores-vigentes.html")
    def standing_fragment() -> Response:
        response = reply(standing_html(collector.board(), collector.entries), "text/html")
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    @app.get("/livez")
    def livez() -> Response:
        return reply("ok\n", "text/plain")

    return app


def serve(config: CollectorConfig, stop: threading.Event) -> None:
    """Run the collector until ``stop`` is set. Raises ``ConfigError``."""
    collector = Collector(config)
    collector.scan_manifests()
    host, port = parse_listen(config.listen)
    app = create_collector_app(collector).wsgi_app
    # Like the agent: a reverse proxy on this host (connecting from the loopback
    # address of the listen address's family) may pass the client in X-Forwarded-For.
    proxy = loopback_for(host)
    server = Server(host, port, app, ServerLimits(threads=16), trusted_proxy=proxy)
    poller = Poller(collector)
    server.start()
    poller.start()
    log.info("collector listening on %s", server.address)
    print(f"collector listening on http://{server.address}/", flush=True)
    try:
        stop.wait()
    finally:
        poller.stop()
        server.stop()
        collector.store.close()
        collector.deliveries.close()
