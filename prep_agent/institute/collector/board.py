"""The collector's view of every difusor at one instant (pure, clock injected).

States (dashboard labels in Spanish):

- ``sin-reportes``: no report (push or poll) for ``silent_after`` seconds, or never;
- ``falla``: the last report says ``fail`` (the agent cannot publish);
- ``rezagado``: it publishes a sequence below the latest the institute signed;
- ``al-dia``: it publishes the latest signed cut (or a newer one we have not read yet).

A difusor not ``al-dia`` has been failing since the earliest of: its last report
(when silent), its first ``fail`` report in a row, and the signing of the first
cut it has not published, and the first failed delivery of a cut it does not hold
(``prep-agent distribute``). When that lasts ``unlink_periods`` cut periods it
is flagged: the convocatoria says to unlink it, and it drops out of the list of
difusores in good standing until it is current again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from prep_agent.core.cuttime import format_cut_time
from prep_agent.core.errors import Rejection
from prep_agent.core.manifest import parse_rfc3339
from prep_agent.institute.collector.store import DifusorRecord, SignedCut, check_value

AL_DIA = "al-dia"
REZAGADO = "rezagado"
SIN_REPORTES = "sin-reportes"
FALLA = "falla"
LABELS = {AL_DIA: "al día", REZAGADO: "rezagado", SIN_REPORTES: "sin reportes", FALLA: "falla"}
"""Dashboard text of each state."""
DEFAULT_PERIOD = 600
"""Cut period (seconds) when no signed manifest is known (prep-cut-v1 default)."""
_SEVERITY = {SIN_REPORTES: 0, FALLA: 1, REZAGADO: 2, AL_DIA: 3}


@dataclass(frozen=True)
class Row:
    """One difusor on the dashboard (also one JSON object and one CSV line)."""

    service_id: str
    name: str
    state: str
    label: str
    status: str | None
    sequence: int | None
    cut_time: str | None
    cut_time_text: str | None
    latest_sequence: int | None
    behind: int | None
    cut_age: float | None
    last_report: str | None
    last_report_age: float | None
    source: str | None
    failing_since: str | None
    failing_for: float | None
    unlink: bool
    output: str | None
    poll_error: str | None
    contact: str | None = None
    delivered_sequence: int | None = None
    delivery_latency: float | None = None
    published_sequence: int | None = None
    publish_latency: float | None = None
    delivery_error: str | None = None
    copy: str | None = None
    """The latest audit of its public copy: intact, altered, stale, unreachable (None: never)."""
    copy_label: str | None = None
    copy_detail: str | None = None
    copy_checked: str | None = None
    copy_audited_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return asdict(self)


@dataclass(frozen=True)
class Board:
    """Every row, the latest signed cut and the thresholds used."""

    now: datetime
    rows: tuple[Row, ...]
    latest: SignedCut | None
    period_seconds: float
    unlink_after: float
    silent_after: float

    def counts(self) -> dict[str, int]:
        """How many difusores in each state, and how many to unlink."""
        counts = {state: 0 for state in LABELS}
        for row in self.rows:
            counts[row.state] += 1
        counts["desvincular"] = sum(1 for row in self.rows if row.unlink)
        return counts


def _moment(text: object) -> datetime | None:
    try:
        return parse_rfc3339(text, "time")
    except Rejection:
        return None


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _behind_since(sequence: int | None, cuts: Sequence[SignedCut]) -> float | None:
    """When the first signed cut after ``sequence`` became available (Unix time): the
    earlier of its ``signed_at`` and when the collector learned of it (a clock ahead
    at the institute must not postpone the flag)."""
    times = []
    for cut in cuts:
        if sequence is None or cut.sequence > sequence:
            signed = _moment(cut.signed_at)
            times.append(min(cut.recorded_at, signed.timestamp() if signed else cut.recorded_at))
    return min(times) if times else None


def _state(
    rec: DifusorRecord, seq: int | None, latest: SignedCut | None, now: float, silent_after: float
) -> str:
    doc = rec.last_doc or {}
    if rec.last_report_at is None or now - rec.last_report_at > silent_after:
        return SIN_REPORTES
    if doc.get("status") == "fail":
        return FALLA
    if latest is not None and (seq is None or seq < latest.sequence):
        return REZAGADO
    return AL_DIA


def make_row(
    rec: DifusorRecord,
    name: str,
    cuts: Sequence[SignedCut],
    now: datetime,
    silent_after: float,
    unlink_after: float,
    delivery: Mapping[str, Any] | None = None,
    contact: str | None = None,
    audit: Mapping[str, Any] | None = None,
) -> Row:
    """The dashboard row of one difusor; ``delivery`` is its
    ``deliveries.target_summary`` (None when the institute never delivered to it),
    ``audit`` its ``audits.copy_summary`` (an altered copy is failing since its
    first altered audit in a row)."""
    ts = now.timestamp()
    doc = rec.last_doc or {}
    raw_seq = check_value(doc, "cut:sequence")
    seq = raw_seq if isinstance(raw_seq, int) and not isinstance(raw_seq, bool) else None
    latest = cuts[-1] if cuts else None
    state = _state(rec, seq, latest, ts, silent_after)
    cut_text = check_value(doc, "cut:time")
    cut_time = _moment(cut_text)
    since: list[float] = []
    if state != AL_DIA:
        if state == SIN_REPORTES:
            since.append(rec.last_report_at or rec.first_seen)
        if rec.fail_since is not None and doc.get("status") == "fail":
            since.append(rec.fail_since)
        if latest is not None and (seq is None or seq < latest.sequence):
            behind = _behind_since(seq, cuts)
            since += [behind] if behind is not None else []
    delivery = dict(delivery or {})
    delivery_since = delivery.pop("delivery_failing_since", None)
    if delivery_since is not None:
        since.append(delivery_since)
    audit = dict(audit or {})
    copy_since = audit.pop("copy_failing_since", None)
    if copy_since is not None:
        since.append(copy_since)
    failing_since = min(since) if since else None
    failing_for = max(0.0, ts - failing_since) if failing_since is not None else None
    return Row(
        service_id=rec.service_id,
        name=name,
        state=state,
        label=LABELS[state],
        status=doc.get("status") if isinstance(doc.get("status"), str) else None,
        sequence=seq,
        cut_time=cut_text if isinstance(cut_text, str) else None,
        cut_time_text=format_cut_time(cut_text, cut_time) if cut_time and cut_text else None,
        latest_sequence=latest.sequence if latest else None,
        behind=(latest.sequence - (seq or 0)) if latest and (seq or 0) < latest.sequence else 0,
        cut_age=round(ts - cut_time.timestamp(), 1) if cut_time else None,
        last_report=_iso(rec.last_report_at),
        last_report_age=round(ts - rec.last_report_at, 1) if rec.last_report_at else None,
        source=rec.last_source,
        failing_since=_iso(failing_since),
        failing_for=round(failing_for, 1) if failing_for is not None else None,
        unlink=failing_for is not None and failing_for >= unlink_after,
        output=str(doc["output"])[:200] if doc.get("output") else None,
        poll_error=rec.poll_error,
        contact=contact,
        **delivery,
        **audit,
    )


def make_board(
    records: Sequence[DifusorRecord],
    names: dict[str, str],
    cuts: Sequence[SignedCut],
    now: datetime,
    silent_after: float,
    unlink_periods: int,
    period_override: float | None = None,
    deliveries: Mapping[str, Mapping[str, Any]] | None = None,
    contacts: Mapping[str, str | None] | None = None,
    audits: Mapping[str, Mapping[str, Any]] | None = None,
) -> Board:
    """Rows for ``records``, worst first (to unlink, silent, failing, behind, up to date);
    ``deliveries`` maps a difusor to its delivery summary, ``audits`` to its copy summary."""
    latest = cuts[-1] if cuts else None
    period = period_override or (latest.period_seconds if latest else DEFAULT_PERIOD)
    unlink_after = unlink_periods * period
    deliveries = deliveries or {}
    contacts = contacts or {}
    audits = audits or {}
    rows = [
        make_row(
            r,
            names.get(r.service_id, r.service_id),
            cuts,
            now,
            silent_after,
            unlink_after,
            deliveries.get(r.service_id),
            contacts.get(r.service_id),
            audits.get(r.service_id),
        )
        for r in records
    ]
    rows.sort(key=lambda r: (not r.unlink, _SEVERITY[r.state], r.service_id))
    return Board(now, tuple(rows), latest, period, unlink_after, silent_after)
