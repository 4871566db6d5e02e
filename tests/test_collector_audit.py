"""The collector audits every difusor's public copy after every cut (issue 17).

Real agents push to a real collector; the collector knows the institute's
allowed_signers ([distribute]) and audits each difusor once it reports a new
cut (or ``[audit] after`` seconds later): diario-a serves an untouched copy,
diario-b is read through a hostile front that answers every CSV with an HTML
error page (an altered copy), diario-c never receives the second cut (a stale
copy). The dashboard, the API, the good-standing list and the ``audits`` table
must say so, and the altered copy must count toward the unlink flag.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.auditkit import HTML_ERROR, Front
from tests.collectorkit import CollectorProc, Difusor, deliver_cut, make_difusor
from tests.kit import Institute, free_port, wait_for

pytestmark = pytest.mark.timeout(120)


class AuditingCollector(CollectorProc):
    """A collector with the institute's trust and an ``[audit]`` section; ``public``
    maps a difusor to the site it is audited at (default: its own server)."""

    institute_trust: Path
    public: dict[str, str]

    def write_config(self) -> Path:
        path = super().write_config()
        text = path.read_text()
        for sid, url in self.public.items():
            text = text.replace(
                f"[difusor:{sid}]\n", f"[difusor:{sid}]\nstatus_url = {url}/status.json\n"
            )
        text += (
            f"[distribute]\nallowed_signers = {self.institute_trust}\nelection = coah-ayun-2021\n"
            "[audit]\nsample = 1\nfull_every = 2\nafter = 5\ntimeout = 5\n"
        )
        path.write_text(text)
        return path


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Institute, AuditingCollector, list[Difusor], Front]]:
    inst = Institute(tmp_path / "inst")
    port = free_port()
    trust = tmp_path / "difusores_allowed_signers"
    manifests = tmp_path / "salida"
    manifests.mkdir()
    push = f"http://127.0.0.1:{port}/reports"
    made = [make_difusor(tmp_path, inst, sid, push) for sid in ("diario-a", "diario-b", "diario-c")]
    trust.write_text("".join(line + "\n" for _, line in made))
    difusores = [d for d, _ in made]
    home = tmp_path / "collector"
    home.mkdir()
    collector = AuditingCollector(home, port, manifests, trust, {}, difusores)
    collector.institute_trust = inst.allowed_signers
    with Front(difusores[1].url) as front:
        front.endings[".csv"] = HTML_ERROR
        collector.public = {"diario-b": front.url}
        collector.start()
        try:
            for d in difusores:
                d.start()
            yield inst, collector, difusores, front
        finally:
            for d in difusores:
                d.stop()
            collector.stop()


def _copies(collector: CollectorProc) -> dict[str, Any]:
    return {sid: (r["copy"], r["sequence"]) for sid, r in collector.rows().items()}


def _audits(collector: CollectorProc) -> list[tuple[str, int, str, int]]:
    with sqlite3.connect(collector.home / "collector.sqlite") as db:
        rows = db.execute("SELECT difusor, expected, verdict, full FROM audits ORDER BY id")
        return [tuple(r) for r in rows]  # type: ignore[misc]


def test_every_difusor_audited_after_every_cut(
    fleet: tuple[Institute, AuditingCollector, list[Difusor], Front],
) -> None:
    inst, collector, (a, b, c), _front = fleet
    deliver_cut(inst, [a.config.inbox, b.config.inbox, c.config.inbox], collector.manifests, 1)
    expected = {"diario-a": ("intact", 1), "diario-b": ("altered", 1), "diario-c": ("intact", 1)}
    wait_for(lambda: _copies(collector) == expected, 30, f"audits of cut 1: {expected}")
    rows = collector.rows()
    assert rows["diario-b"]["state"] == "al-dia"  # its agent is fine: only its public copy is not
    assert "datos/COAH_AYUN_2021.csv: expected" in rows["diario-b"]["copy_detail"]
    standing = requests.get(collector.url + "/difusores-vigentes.json", timeout=5).json()
    assert [d["serviceId"] for d in standing["difusores"]] == ["diario-a", "diario-c"]
    html = requests.get(collector.url + "/", timeout=5).text
    assert "Copia pública" in html and "copia íntegra" in html and "copia alterada" in html

    # An altered copy is an incident: three periods (of 2 s) later, diario-b is flagged.
    wait_for(lambda: collector.rows()["diario-b"]["unlink"], 20, "diario-b flagged")
    assert not collector.rows()["diario-a"]["unlink"]

    # Cut 2 reaches diario-a and diario-b only: diario-c's copy is audited `after` 5 s.
    deliver_cut(inst, [a.config.inbox, b.config.inbox], collector.manifests, 2)
    expected = {"diario-a": ("intact", 2), "diario-b": ("altered", 2), "diario-c": ("stale", 1)}
    wait_for(lambda: _copies(collector) == expected, 30, f"audits of cut 2: {expected}")
    html = requests.get(collector.url + "/", timeout=5).text
    assert "desactualizada" in html
    audits = _audits(collector)
    # Each cut is audited until settled (a copy audited before it published the cut is
    # stale and audited again), once settled never again; every second audit is in full.
    mine = [r for r in audits if r[0] == "diario-a"]
    assert [r[1:3] for r in mine if r[2] == "intact"] == [(1, "intact"), (2, "intact")]
    assert [r[3] for r in mine] == [1, 0, 1, 0][: len(mine)]
