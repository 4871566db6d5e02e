"""Checking one pushed health report (health-v1 §3, the receiving side).

Pure: body bytes, the ``PREP-Signature`` header, trust and the last accepted
time in; a ``Report`` out, or ``ReportRejected`` with a stable reason. No I/O,
clock injected.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prep_agent.core import sshsig
from prep_agent.core.allowed_signers import AllowedSigner
from prep_agent.core.errors import Error, Rejection, SignatureFormatError
from prep_agent.core.manifest import parse_rfc3339
from prep_agent.core.protocol import NAMESPACE_HEALTH

MAX_REPORT_BYTES = 256 * 1024
"""Largest report body accepted (a health document is a few KiB)."""

# Rejection reasons, as counted by the collector and shown on the dashboard.
SIGNATURE_MISSING = "signature-missing"
"""No ``PREP-Signature`` header."""
SIGNATURE_MALFORMED = "signature-malformed"
"""The header is not the base64 of one SSHSIG blob."""
REPORT_INVALID = "report-invalid"
"""The body is not a health document with ``serviceId`` and an RFC 3339 ``time``."""
UNKNOWN_DIFUSOR = "unknown-difusor"
"""``serviceId`` is not a registered difusor."""
SIGNATURE_UNTRUSTED = "signature-untrusted"
"""The signature does not verify with a key allowed for that ``serviceId``."""
TIME_WINDOW = "time-window"
"""``time`` is more than ``max_skew`` away from the collector's clock."""
REPLAY = "replay"
"""``time`` is not newer than the last report accepted from that difusor."""
TOO_LARGE = "too-large"
"""The body exceeds ``MAX_REPORT_BYTES``."""

REASONS = (
    SIGNATURE_MISSING,
    SIGNATURE_MALFORMED,
    REPORT_INVALID,
    UNKNOWN_DIFUSOR,
    SIGNATURE_UNTRUSTED,
    TIME_WINDOW,
    REPLAY,
    TOO_LARGE,
)


class ReportRejected(Error):
    """A pushed report is refused; ``reason`` is one of ``REASONS``.

    ``service_id`` is set only once the signature verified (``TIME_WINDOW``,
    ``REPLAY``): before that, the body's ``serviceId`` is a claim anyone can make.
    """

    def __init__(self, reason: str, detail: str, service_id: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.service_id = service_id


@dataclass(frozen=True)
class Report:
    """An accepted (or polled) health document."""

    service_id: str
    time: datetime
    doc: dict[str, Any]


def parse_document(body: bytes) -> Report:
    """Parse a health document's ``serviceId`` and ``time``. Raises ``ReportRejected``."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise ReportRejected(REPORT_INVALID, "body is not JSON") from None
    if not isinstance(doc, dict):
        raise ReportRejected(REPORT_INVALID, "body is not a JSON object")
    service_id = doc.get("serviceId")
    if not isinstance(service_id, str) or not service_id:
        raise ReportRejected(REPORT_INVALID, "no serviceId")
    try:
        moment = parse_rfc3339(doc.get("time"), "time")
    except Rejection as exc:
        raise ReportRejected(REPORT_INVALID, exc.detail) from None
    return Report(service_id, moment, doc)


def _decode_header(header: str | None) -> sshsig.Signature:
    if not header:
        raise ReportRejected(SIGNATURE_MISSING, "no PREP-Signature header")
    try:
        blob = base64.b64decode(header.strip(), validate=True)
        return sshsig.parse_blob(blob)
    except (binascii.Error, ValueError, SignatureFormatError) as exc:
        raise ReportRejected(SIGNATURE_MALFORMED, f"PREP-Signature: {exc}") from None


def check_report(
    body: bytes,
    header: str | None,
    signers: Sequence[AllowedSigner],
    registered: Collection[str],
    last_accepted: datetime | None,
    now: datetime,
    max_skew: float,
) -> Report:
    """Accept a pushed report or raise ``ReportRejected`` (health-v1 §3).

    In order: size, signature syntax, body, registered ``serviceId``, the
    signature against the allowed_signers lines whose principals match
    ``serviceId`` (namespace ``prep-health``), ``time`` within ``max_skew``
    seconds of ``now``, then ``time`` after ``last_accepted`` (no replay).
    """
    if len(body) > MAX_REPORT_BYTES:
        raise ReportRejected(TOO_LARGE, f"{len(body)} bytes > {MAX_REPORT_BYTES}")
    sig = _decode_header(header)
    report = parse_document(body)
    sid = report.service_id
    if sid not in registered:
        raise ReportRejected(UNKNOWN_DIFUSOR, f"serviceId {sid[:64]!r} is not registered")
    lines = [s for s in signers if s.matches_principal(sid)]
    signer, why = sshsig.check_signature(sig, body, lines, NAMESPACE_HEALTH, now)
    if signer is None:
        raise ReportRejected(SIGNATURE_UNTRUSTED, f"claims to be {sid[:64]!r}: {why}")
    skew = abs((report.time - now).total_seconds())
    if skew > max_skew:
        detail = f"time is {skew:.0f} s from ours (max {max_skew:.0f})"
        raise ReportRejected(TIME_WINDOW, detail, sid)
    if last_accepted is not None and report.time <= last_accepted:
        raise ReportRejected(
            REPLAY, f"time {report.time.isoformat()} not after {last_accepted.isoformat()}", sid
        )
    return report
