"""The dashboard's delivery columns, the 3-period flag that combines failed
deliveries with health, and the list of difusores in good standing."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from prep_agent.institute.collector.board import AL_DIA, Board, make_board
from prep_agent.institute.collector.config import DifusorEntry
from prep_agent.institute.collector.deliveries import (
    DELIVERED,
    FAILED,
    Attempt,
    DeliveryLog,
    target_summary,
)
from prep_agent.institute.collector.standing import good_standing, standing_html
from prep_agent.institute.collector.store import DifusorRecord, SignedCut

pytestmark = pytest.mark.core

NOW = datetime(2021, 6, 6, 21, 0, tzinfo=timezone.utc)
PERIOD = 600


def healthy(sid: str, seq: int) -> DifusorRecord:
    """A difusor whose last report (a minute ago) says it publishes ``seq``."""
    doc = {"status": "pass", "checks": {"cut:sequence": [{"observedValue": seq}]}}
    ts = NOW.timestamp()
    return DifusorRecord(sid, ts - 7200, ts - 60, "push", doc, None, None, None)


def cut(seq: int, minutes_ago: float) -> SignedCut:
    signed = NOW - timedelta(minutes=minutes_ago)
    return SignedCut(
        seq, "e", signed.isoformat(), signed.isoformat(), PERIOD, False, signed.timestamp()
    )


def test_failed_deliveries_flag_after_three_periods_and_recovery_clears(tmp_path: Path) -> None:
    log = DeliveryLog(tmp_path / "collector.sqlite")
    start = NOW.timestamp() - 3 * PERIOD - 5
    log.record_attempt(Attempt("roto", 7, start, start + 1, 3, 100, FAILED, "connection refused"))
    log.record_attempt(
        Attempt("sano", 7, start, start + 2, 3, 100, DELIVERED), {"a": "x"}, start - 1
    )
    log.record_published("sano", 7, start + 4)
    entries = {
        sid: DifusorEntry(
            sid, name, contact=f"tel. {sid}", status_url=f"https://{sid}.mx/status.json"
        )
        for sid, name in (("roto", "Diario <Roto>"), ("sano", "Diario Sano"))
    }

    def board() -> Board:
        return make_board(
            [healthy("roto", 7), healthy("sano", 7)],
            {sid: e.name for sid, e in entries.items()},
            [cut(7, 40)],
            NOW,
            180,
            3,
            None,
            {sid: target_summary(r) for sid, r in log.targets().items()},
            {sid: e.contact for sid, e in entries.items()},
        )

    rows = {r.service_id: r for r in board().rows}
    # health alone says both are current; the failed deliveries flag one of them
    assert rows["roto"].state == rows["sano"].state == AL_DIA
    assert rows["roto"].unlink and not rows["sano"].unlink
    assert rows["roto"].delivery_error == "connection refused"
    assert rows["roto"].contact == "tel. roto"
    assert (rows["sano"].delivered_sequence, rows["sano"].published_sequence) == (7, 7)
    assert (rows["sano"].delivery_latency, rows["sano"].publish_latency) == (3.0, 2.0)
    assert [d["serviceId"] for d in good_standing(board(), entries)] == ["sano"]
    assert standing_html(board(), entries) == (
        '<ul class="prep-difusores" aria-label="Difusores oficiales del PREP">\n'
        '  <li data-difusor="sano"><a href="https://sano.mx/" rel="noopener" '
        'target="_blank">Diario Sano</a></li>\n</ul>\n'
    )
    # current again: it returns to the list by itself
    log.record_attempt(
        Attempt("roto", 8, NOW.timestamp() - 9, NOW.timestamp() - 8, 1, 9, DELIVERED)
    )
    assert [d["name"] for d in good_standing(board(), entries)] == ["Diario <Roto>", "Diario Sano"]
    assert "Diario &lt;Roto&gt;" in standing_html(board(), entries)
    log.close()
