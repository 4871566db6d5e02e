"""The simulated institute: realistic PREP cuts that the real agent publishes.

Cuts are checked against the real 2021 PREP files in ``/work/shared/fixtures``
and delivered to a real agent, through a local copy and through the OpenSSH
``sftp`` client talking to a real ``sftp-server``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from prep_agent.agent.config import Config
from prep_agent.agent.journal import read_journal
from prep_agent.core import sshkeys, stamps
from prep_agent.core.errors import Error
from prep_agent.core.manifest import MANIFEST_NAME, SIGNATURE_NAME, WELL_KNOWN
from prep_agent.daemon import Agent, Outcome
from prep_agent.institute import delivery
from prep_agent.institute.sign import CutInfo, sign_folder
from prep_agent.institute.simulation import run
from prep_agent.institute.simulation.database import ACTA_HEADER, CSV_PATH
from prep_agent.institute.simulation.election import Simulation
from prep_agent.institute.simulation.site import CSS_PATH, LOGO_PATH, build_cut
from tests.kit import OFFSET, SHARED, Institute, make_config, minute_ago, tree_digest

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
REAL_AYUN = SHARED / "fixtures/prep-real/campeche-2021-cuts/20210607_2000_PREP_AYUN_CAMP"
T0 = datetime(2021, 6, 6, 20, 30, 41, tzinfo=OFFSET)
SIM = Simulation()


def read_cut_csv(data: bytes) -> tuple[list[str], dict[str, str], list[dict[str, str]]]:
    """Lines 1-2, the summary as a dict, and the acta rows, parsed as a difusor would."""
    text = data.decode("utf-8-sig")
    lines = text.split("\n")
    summary = dict(zip(lines[2].split(","), lines[3].split(",")))
    assert lines[4] == "", "a blank line separates the summary from the acta table"
    rows = list(csv.DictReader(io.StringIO("\n".join(lines[5:]))))
    return lines[:2], summary, rows


def cut_csv(folder: Path) -> tuple[list[str], dict[str, str], list[dict[str, str]]]:
    return read_cut_csv((folder / CSV_PATH).read_bytes())


def captured(folder: Path) -> set[str]:
    return {r["CLAVE_ACTA"] for r in cut_csv(folder)[2] if r["CLAVE_ACTA"] != "-"}


def signed_cut(
    key: sshkeys.PrivateKey, folder: Path, sequence: int, when: datetime, final: bool = False
) -> Path:
    build_cut(SIM, sequence, when, folder, final=final)
    info = CutInfo(SIM.election, sequence, when.isoformat(), final=final, period_seconds=600)
    sign_folder(folder, key, info)
    return folder


def published_events(config: Config) -> list[dict[str, Any]]:
    return [e for e in read_journal(config.journal_file) if e.get("event") == "cut-published"]


def public_tree(folder: Path) -> dict[str, str]:
    """A tree's digests without the manifest, signature and .well-known copies."""
    skip = (MANIFEST_NAME, SIGNATURE_NAME)
    return {
        p: d
        for p, d in tree_digest(folder).items()
        if p not in skip and not p.startswith(WELL_KNOWN)
    }


@pytest.fixture()
def key(institute: Institute) -> sshkeys.PrivateKey:
    return sshkeys.load_private_key(institute.key.read_bytes())


# --- the cut ----------------------------------------------------------------------------


@pytest.mark.core
def test_cut_is_a_deterministic_function_of_seed_sequence_and_time(tmp_path: Path) -> None:
    build_cut(SIM, 4, T0, tmp_path / "a")
    build_cut(SIM, 4, T0, tmp_path / "b")
    build_cut(Simulation(seed=7), 4, T0, tmp_path / "c")
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    other = tree_digest(tmp_path / "c")
    assert other[CSV_PATH] != tree_digest(tmp_path / "a")[CSV_PATH]
    assert other[CSS_PATH] == tree_digest(tmp_path / "a")[CSS_PATH]
    with pytest.raises(Error, match="already exists"):
        build_cut(SIM, 4, T0, tmp_path / "a")


@pytest.mark.core
def test_csv_has_the_real_prep_layout(tmp_path: Path) -> None:
    build_cut(SIM, 6, T0, tmp_path / "cut")
    data = (tmp_path / "cut" / CSV_PATH).read_bytes()
    head, summary, rows = read_cut_csv(data)
    real_head, real_summary, real_rows = read_cut_csv(
        (REAL_AYUN / "CAMP_AYUN_2021.csv").read_bytes()
    )

    assert head == ["AYUNTAMIENTOS", "06/06/2021 20:30 (UTC-6)"]
    assert stamps.parse_csv_stamp(data[:4096]) == T0.replace(second=0)
    assert list(summary) == list(real_summary)
    party_free = [c for c in real_rows[0] if not c.startswith(("C_", "CAND_IND")) and c.isupper()]
    assert [c for c in rows[0] if c in party_free] == [
        c for c in party_free if c not in ("MOR", "FM")
    ], "every non-party column of the real AYUN file, in the same order"
    for column in ("MORENA", "PAN", "PRI", "PRD", "PT", "PVEM", "MC", "NO_REGISTRADOS", "NULOS"):
        assert column in rows[0]
    assert all(None not in r and len(r) == len(ACTA_HEADER) for r in rows)

    acta_rows = [r for r in rows if r["CLAVE_ACTA"] != "-"]
    assert len(acta_rows) == int(summary["ACTAS_CAPTURADAS"]) > 1000
    assert len(rows) == int(summary["ACTAS_REGISTRADAS"])
    assert len(rows) - len(acta_rows) == int(summary["ACTAS_FUERA_CATALOGO"]) > 0
    counted = [r for r in acta_rows if r["CONTABILIZADA"] == "1"]
    assert len(counted) == int(summary["ACTAS_CONTABILIZADAS"])
    assert sum(int(r["TOTAL_VOTOS_CALCULADO"]) for r in counted) == int(summary["TOTAL_VOTOS_C_CS"])
    assert sum(int(r["LISTA_NOMINAL"]) for r in counted) == int(
        summary["LISTA_NOMINAL_ACTAS_CONTABILIZADAS"]
    )
    cells = {v for r in acta_rows for v in r.values()}
    assert {"Ilegible", "Sin dato", "-"} <= cells
    for r in acta_rows:
        assert r["CLAVE_CASILLA"] == (
            f"{r['ID_ESTADO']}{r['SECCION']}{r['TIPO_CASILLA']}{r['ID_CASILLA']}{r['EXT_CONTIGUA']}"
        )
        verified = datetime.strptime(r["FECHA_HORA_VERIFICACION"], "%d/%m/%Y %H:%M:%S")
        assert verified.replace(tzinfo=OFFSET) <= T0


@pytest.mark.core
def test_final_cut_has_all_38_municipalities_and_every_acta(tmp_path: Path) -> None:
    build_cut(SIM, 20, T0, tmp_path / "cut", final=True)
    _, summary, rows = cut_csv(tmp_path / "cut")
    assert summary["ACTAS_CAPTURADAS"] == summary["ACTAS_ESPERADAS"]
    assert 3_500 <= int(summary["ACTAS_ESPERADAS"]) <= 4_200
    names = {r["ID_MUNICIPIO"]: r["MUNICIPIO"] for r in rows if r["ID_MUNICIPIO"] != "-"}
    assert sorted(names) == [f"{i:03d}" for i in range(1, 39)]
    assert names["001"] == "ABASOLO" and names["002"] == "ACUÑA" and names["038"] == "ZARAGOZA"
    assert names["030"] == "SALTILLO" and names["035"] == "TORREÓN"
    per = {i: sum(r["ID_MUNICIPIO"] == i for r in rows) for i in names}
    assert sorted(per, key=per.__getitem__)[-2:] == ["035", "030"]  # Torreón, Saltillo
    pages = sorted(p.name for p in (tmp_path / "cut" / "municipios").iterdir())
    assert pages == sorted(f"{i}.html" for i in range(1, 39))
    index = (tmp_path / "cut" / "index.html").read_text(encoding="utf-8")
    assert 'lang="es-MX"' in index and "Corte final" in index
    assert '<a href="municipios/35.html">Torreón</a>' in index


@pytest.mark.core
def test_captured_actas_grow_with_the_sequence_and_rows_stay_put(tmp_path: Path) -> None:
    folders = []
    for sequence in range(1, 6):
        folder = tmp_path / str(sequence)
        build_cut(SIM, sequence, T0 + timedelta(minutes=10 * sequence), folder, final=sequence == 5)
        folders.append(folder)
    sets = [captured(f) for f in folders]
    assert all(a < b for a, b in zip(sets, sets[1:])), [len(s) for s in sets]
    # With the promised cadence, an acta's row does not change once captured.
    first = {r["CLAVE_ACTA"]: r for r in cut_csv(folders[0])[2]}
    second = {r["CLAVE_ACTA"]: r for r in cut_csv(folders[1])[2]}
    assert all(second[k] == row for k, row in first.items() if k != "-")


@pytest.mark.core
def test_zip_is_named_by_the_cut_minute_and_holds_the_csv_and_leeme(tmp_path: Path) -> None:
    build_cut(SIM, 2, T0, tmp_path / "cut")
    zip_file = tmp_path / "cut" / "datos" / "20210606_2030_PREP_AYUN_COAH.zip"
    with zipfile.ZipFile(zip_file) as archive:
        assert sorted(archive.namelist()) == ["COAH_AYUN_2021.csv", "LEEME.txt"]
        assert archive.read("COAH_AYUN_2021.csv") == (tmp_path / "cut" / CSV_PATH).read_bytes()
        assert "instructivo" in archive.read("LEEME.txt").decode("utf-8")
    with open(zip_file, "rb") as fh:
        stamps.check_zip(zip_file.name, fh, T0)  # what the agent checks (§4.7)
        with pytest.raises(Error, match="stamp"):
            stamps.check_zip(zip_file.name, fh, T0 + timedelta(minutes=1))


# --- delivery to the real agent ---------------------------------------------------------


def test_three_cuts_from_run_institute_are_published_reusing_unchanged_files(
    tmp_path: Path, institute: Institute, key: sshkeys.PrivateKey
) -> None:
    config = make_config(tmp_path, institute)
    agent = Agent(config)
    times: Iterator[datetime] = iter(minute_ago(m) + timedelta(seconds=20) for m in (30, 20, 10))
    outcomes: list[Outcome] = []
    css_stats = []

    def deliver(folder: Path) -> None:
        delivery.deliver_local(folder, config.inbox)
        css_stats.append((config.inbox / CSS_PATH).stat())
        outcomes.append(agent.step(settle=False))

    run.run_institute(
        SIM,
        key,
        tmp_path / "out",
        deliver,
        0,
        3,
        threading.Event(),
        lambda: next(times),
        final=True,
    )

    assert [(o.status, o.sequence) for o in outcomes] == [("published", n) for n in (1, 2, 3)]
    events = published_events(config)
    assert [e["sequence"] for e in events] == [1, 2, 3]
    assert events[0]["bytes_copied"] == events[0]["bytes"]
    assert all(0 < e["bytes_copied"] < e["bytes"] for e in events[1:])
    assert len({(s.st_ino, s.st_mtime_ns) for s in css_stats}) == 1, "unchanged CSS not re-copied"
    assert public_tree(config.current) == public_tree(tmp_path / "out" / "000003")
    doc = json.loads((config.current / WELL_KNOWN / "manifest.json").read_bytes())
    assert doc["final"] is True and doc["period_seconds"] == 600
    assert doc["cut_time"].endswith("-06:00") and doc["cut_time"][17:19] == "00"


def test_run_institute_continues_the_sequence_and_prunes_old_cuts(
    tmp_path: Path, key: sshkeys.PrivateKey
) -> None:
    delivered: list[str] = []
    out = tmp_path / "out"
    for cuts in (3, 2):
        run.run_institute(
            SIM, key, out, lambda f: delivered.append(f.name), 0, cuts, threading.Event(), keep=2
        )
    assert delivered == ["000001", "000002", "000003", "000004", "000005"]
    assert sorted(p.name for p in out.iterdir()) == ["000004", "000005"]
    stop = threading.Event()
    stop.set()
    run.run_institute(SIM, key, out, lambda f: delivered.append(f.name), 0, 0, stop)
    assert len(delivered) == 5


def test_deliver_sftp_uploads_with_the_real_client_then_only_changes(
    tmp_path: Path, institute: Institute, key: sshkeys.PrivateKey
) -> None:
    config = make_config(tmp_path, institute)
    agent = Agent(config)
    target = f"institute@sftp.example:{config.inbox}"
    first = signed_cut(key, tmp_path / "c1", 1, minute_ago(20))
    second = signed_cut(key, tmp_path / "c2", 2, minute_ago(10))

    delivery.deliver_sftp(first, target, sftp_server=SFTP_SERVER)
    assert agent.step(settle=False).status == "published"
    logo = (config.inbox / LOGO_PATH).stat()
    batch = delivery.sftp_batch(second, str(config.inbox), previous=first)
    assert not any(LOGO_PATH in line or CSS_PATH in line for line in batch)
    assert batch[-3:] == [
        f'put "{second / MANIFEST_NAME}" "{MANIFEST_NAME}"',
        f'put "{second / SIGNATURE_NAME}" ".{SIGNATURE_NAME}.part"',
        f'rename ".{SIGNATURE_NAME}.part" "{SIGNATURE_NAME}"',
    ]
    delivery.deliver_sftp(second, target, previous=first, sftp_server=SFTP_SERVER)

    assert agent.step(settle=False) == Outcome("published", 2)
    again = (config.inbox / LOGO_PATH).stat()
    assert (again.st_ino, again.st_mtime_ns) == (logo.st_ino, logo.st_mtime_ns)
    assert not (config.inbox / f".{SIGNATURE_NAME}.part").exists()
    assert public_tree(config.current) == public_tree(second)
    assert 0 < published_events(config)[-1]["bytes_copied"] < published_events(config)[-1]["bytes"]


def test_deliver_sftp_reports_a_failed_upload(tmp_path: Path, key: sshkeys.PrivateKey) -> None:
    cut = signed_cut(key, tmp_path / "c1", 1, minute_ago(5))
    with pytest.raises(Error, match="sftp upload failed"):
        delivery.deliver_sftp(cut, f"x@y:{tmp_path}/missing", sftp_server=SFTP_SERVER)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("prep@difusor.mx:inbox", ("prep@difusor.mx", "inbox")),
        ("prep@[2001:db8::1]:/srv/prep inbox", ("prep@[2001:db8::1]", "/srv/prep inbox")),
        ("difusor", ("difusor", "")),
    ],
)
@pytest.mark.core
def test_split_target(target: str, expected: tuple[str, str]) -> None:
    assert delivery.split_target(target) == expected


@pytest.mark.core
def test_split_target_rejects_a_missing_host() -> None:
    with pytest.raises(Error, match="USER@HOST:DIR"):
        delivery.split_target(":inbox")


# --- the command ------------------------------------------------------------------------


def namespace(**values: Any) -> argparse.Namespace:
    defaults: dict[str, Any] = {
        "key": None,
        "out": None,
        "inbox": None,
        "sftp": None,
        "identity": None,
        "port": None,
        "interval": 0.01,
        "cuts": 2,
        "final": False,
        "seed": 2021,
    }
    return argparse.Namespace(**{**defaults, **values})


def test_main_delivers_cuts_into_the_inbox(
    tmp_path: Path, institute: Institute, capsys: pytest.CaptureFixture[str]
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    args = namespace(
        key=str(institute.key), out=str(tmp_path / "out"), inbox=str(inbox), final=True
    )
    assert run.main(args) == 0
    doc = json.loads((inbox / MANIFEST_NAME).read_bytes())
    assert doc["sequence"] == 2 and doc["final"] is True
    assert capsys.readouterr().out.splitlines() == [
        "institute: delivered cut 1",
        "institute: delivered cut 2",
    ]


def test_main_rejects_two_destinations(tmp_path: Path, institute: Institute) -> None:
    args = namespace(key=str(institute.key), out=str(tmp_path), inbox="a", sftp="u@h:d")
    with pytest.raises(Error, match="exactly one"):
        run.main(args)


def test_run_institute_never_dates_a_cut_before_the_previous_one(
    tmp_path: Path, key: sshkeys.PrivateKey
) -> None:
    times = iter([T0, T0 - timedelta(minutes=5)])
    cut_times: list[str] = []

    def deliver(folder: Path) -> None:
        doc = json.loads((folder / MANIFEST_NAME).read_bytes())
        assert doc["signed_at"] >= doc["cut_time"]
        cut_times.append(doc["cut_time"])

    run.run_institute(SIM, key, tmp_path, deliver, 0, 2, threading.Event(), lambda: next(times))
    assert cut_times == ["2021-06-06T20:30:00-06:00"] * 2
