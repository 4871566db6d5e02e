"""``prep-agent simulate``: a simulated electoral institute that publishes PREP cuts.

The institute of a realistic but entirely fictitious PREP: Coahuila's 2021
ayuntamientos election (its 38 real municipalities, about 3,800 actas, invented
votes). Every cut is a small static results site in Spanish plus the PREP CSV
database in the real INE/OPLE layout and its delivery zip; it is signed with
:func:`prep_agent.sign.sign_folder` and delivered into the difusor's drop
folder, locally or with the OpenSSH ``sftp`` client, in the institute's upload
order (changed files, the manifest, the signature last; prep-cut-v1 §1.2).

A cut is a pure function of the seed, its sequence and its cut time, so the
same cut can be rebuilt byte for byte; the set of captured actas only grows
with the sequence; static assets (CSS, logo) are identical in every cut, so
the agent reuses them instead of copying them again (§4.5).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import html
import io
import math
import random
import re
import shutil
import sys
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from prep_agent.core import sshkeys
from prep_agent.core.errors import Error
from prep_agent.institute.delivery import deliver_local, deliver_sftp, split_target
from prep_agent.institute.sign import CutInfo, load_key, sign_folder

OFFSET = timezone(timedelta(hours=-6), "UTC-6")
"""Coahuila's offset, in which the institute stamps its cuts."""
STATE_ID = "05"
"""INE id of Coahuila de Zaragoza."""
STATE_NAME = "COAHUILA"
CSV_NAME = "COAH_AYUN_2021.csv"
"""The PREP database, at ``datos/`` and inside the delivery zip."""
CSV_PATH = f"datos/{CSV_NAME}"
CSS_PATH = "css/prep.css"
LOGO_PATH = "img/logo-prep.svg"
KEEP_CUTS = 5
"""Cut folders :func:`run_institute` keeps in its output folder (older ones are deleted)."""

MUNICIPALITIES: tuple[tuple[str, int], ...] = (
    ("Abasolo", 1_100),
    ("Acuña", 163_000),
    ("Allende", 23_000),
    ("Arteaga", 29_600),
    ("Candela", 1_800),
    ("Castaños", 28_100),
    ("Cuatro Ciénegas", 13_000),
    ("Escobedo", 2_900),
    ("Francisco I. Madero", 58_100),
    ("Frontera", 80_000),
    ("General Cepeda", 11_700),
    ("Guerrero", 1_900),
    ("Hidalgo", 1_900),
    ("Jiménez", 9_300),
    ("Juárez", 1_500),
    ("Lamadrid", 1_800),
    ("Matamoros", 118_300),
    ("Monclova", 238_000),
    ("Morelos", 8_900),
    ("Múzquiz", 70_400),
    ("Nadadores", 6_600),
    ("Nava", 33_700),
    ("Ocampo", 10_200),
    ("Parras", 45_400),
    ("Piedras Negras", 176_300),
    ("Progreso", 3_300),
    ("Ramos Arizpe", 122_000),
    ("Sabinas", 64_800),
    ("Sacramento", 2_400),
    ("Saltillo", 880_000),
    ("San Buenaventura", 22_700),
    ("San Juan de Sabinas", 40_600),
    ("San Pedro", 102_700),
    ("Sierra Mojada", 5_700),
    ("Torreón", 720_800),
    ("Viesca", 21_500),
    ("Villa Unión", 6_400),
    ("Zaragoza", 13_300),
)
"""Coahuila's municipalities in INE order (id = position + 1), approximate 2020 population."""

PARTIES = ("PAN", "PRI", "PRD", "PT", "PVEM", "UDC", "MC", "MORENA", "PES", "RSP", "FXM")
INDEPENDENT = "CAND_IND_1"
COALITION = "C_PRI_PRD"
OPTIONS = (*PARTIES, INDEPENDENT, COALITION)
"""Vote columns of candidacies; ``-`` where an option has no candidacy."""
VOTE_COLUMNS = (*OPTIONS, "NO_REGISTRADOS", "NULOS")
BASE_SHARE = (0.17, 0.44, 0.02, 0.035, 0.025, 0.03, 0.03, 0.17, 0.02, 0.015, 0.015, 0.06, 0.015)
"""Typical vote share of each of :data:`OPTIONS` where it runs (before noise)."""
OPTION_LABELS = {INDEPENDENT: "Candidatura independiente", COALITION: "Coalición PRI-PRD"}

SUMMARY_HEADER = (
    "ACTAS_ESPERADAS",
    "ACTAS_REGISTRADAS",
    "ACTAS_FUERA_CATALOGO",
    "ACTAS_CAPTURADAS",
    "PORCENTAJE_ACTAS_CAPTURADAS",
    "ACTAS_CONTABILIZADAS",
    "PORCENTAJE_ACTAS_CONTABILIZADAS",
    "PORCENTAJE_ACTAS_INCONSISTENCIAS",
    "ACTAS_NO_CONTABILIZADAS",
    "LISTA_NOMINAL_ACTAS_CONTABILIZADAS",
    "TOTAL_VOTOS_C_CS",
    "TOTAL_VOTOS_S_CS",
    "PORCENTAJE_PARTICIPACION_CIUDADANA",
)
"""Line 3 of the PREP CSV (as in the real 2021 AYUN files)."""
ACTA_HEADER = (
    "CLAVE_CASILLA",
    "CLAVE_ACTA",
    "ID_ESTADO",
    "ESTADO",
    "ID_MUNICIPIO",
    "MUNICIPIO",
    "SECCION",
    "ID_CASILLA",
    "TIPO_CASILLA",
    "EXT_CONTIGUA",
    "UBICACION_CASILLA",
    "TIPO_ACTA",
    "TOTAL_BOLETAS_SOBRANTES",
    "TOTAL_PERSONAS_VOTARON",
    "TOTAL_REP_PARTIDO_CI_VOTARON",
    "TOTAL_VOTOS_SACADOS",
    *VOTE_COLUMNS,
    "TOTAL_VOTOS_ASENTADO",
    "TOTAL_VOTOS_CALCULADO",
    "LISTA_NOMINAL",
    "REPRESENTANTES_PP_CI",
    "OBSERVACIONES",
    "CONTABILIZADA",
    "MECANISMOS_TRASLADO",
    "SHA",
    "FECHA_HORA_ACOPIO",
    "FECHA_HORA_CAPTURA",
    "FECHA_HORA_VERIFICACION",
    "ORIGEN",
    "DIGITALIZACION",
    "TIPO_DOCUMENTO",
)
"""Header of the per-acta table of the PREP CSV."""

# Acta problems, with the OBSERVACIONES text of the real files.
SOME_ILLEGIBLE = "ALGÚN CAMPO ILEGIBLE O SIN DATO"
ALL_ILLEGIBLE = "TODOS ILEGIBLES O SIN DATO"
EXCEEDS = "EXCEDE LISTA NOMINAL"
NO_ACTA = "SIN ACTA POR PAQUETE NO ENTREGADO"
OUT_OF_CATALOG = "FUERA DE CATÁLOGO"
NOT_COUNTED = (ALL_ILLEGIBLE, EXCEEDS, NO_ACTA)
"""Problems that leave an acta out of the count (CONTABILIZADA 0)."""

Clock = Callable[[], datetime]


def now_utc6() -> datetime:
    """The institute's clock: now, in Coahuila's offset."""
    return datetime.now(OFFSET)


@dataclass(frozen=True)
class Simulation:
    """A simulated PREP; every cut is a deterministic function of these fields."""

    election: str = "coah-ayun-2021"
    seed: int = 2021
    period_seconds: int = 600
    """Promised cadence (manifest ``period_seconds``); also spaces capture times."""
    half_life_cuts: float = 6.0
    """Cuts after which half of the actas are captured."""


# --- the election -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Municipality:
    id: int
    name: str
    options: tuple[bool, ...]
    """Per :data:`OPTIONS`: whether it has a candidacy here."""
    shares: tuple[float, ...]
    turnout: float

    @property
    def upper(self) -> str:
        return self.name.upper()


@dataclass(frozen=True)
class _Acta:
    """One acta of escrutinio y cómputo, as it will be captured."""

    municipality: int
    section: int
    kind: str
    number: int
    ext: int
    rural: bool
    nominal: int
    reps: int
    sobrantes: int
    votes: tuple[int, ...]
    """Per :data:`VOTE_COLUMNS` (0 where the option does not run)."""
    problem: str
    unreadable: tuple[tuple[int, str], ...]
    """(index in :data:`VOTE_COLUMNS`, ``Ilegible`` or ``Sin dato``) of unreadable cells."""
    written_delta: int
    """TOTAL_VOTOS_ASENTADO minus the computed total (real actas have sum errors)."""
    delay: float
    """Where in its cut's period it was verified, as a fraction of the period."""
    capture_lag: int
    gather_lag: int
    transfer: str
    origin: str

    @property
    def clave_casilla(self) -> str:
        return f"{STATE_ID}{self.section:04d}{self.kind}{self.number:02d}{self.ext:02d}"

    @property
    def acta_type(self) -> str:
        return "2E" if self.kind == "S" else "2"

    @property
    def clave_acta(self) -> str:
        return f"{self.clave_casilla}0{self.acta_type}"

    @property
    def counted(self) -> bool:
        return self.problem not in NOT_COUNTED


@dataclass(frozen=True)
class _Election:
    municipalities: tuple[_Municipality, ...]
    actas: tuple[_Acta, ...]
    """In capture order."""


@functools.lru_cache(maxsize=4)
def _election(sim: Simulation) -> _Election:
    """The catalogue of actas and their votes, drawn from ``sim.seed``."""
    rng = random.Random(sim.seed)
    municipalities = tuple(
        _draw_municipality(rng, i + 1, n) for i, (n, _) in enumerate(MUNICIPALITIES)
    )
    ranked: list[tuple[float, _Acta]] = []
    section = 1
    for muni, (_, population) in zip(municipalities, MUNICIPALITIES):
        for casilla in _draw_casillas(rng, muni.id, population, section):
            section = max(section, casilla[1] + 1)
            acta = _draw_acta(rng, muni, casilla)
            ranked.append((rng.random() + (0.35 if acta.rural else 0.0), acta))
    ranked.sort(key=lambda item: item[0])
    return _Election(municipalities, tuple(acta for _, acta in ranked))


def _draw_municipality(rng: random.Random, muni_id: int, name: str) -> _Municipality:
    """Which options run in a municipality, and how its voters lean."""
    runs = [True] * len(OPTIONS)
    for i, option in enumerate(OPTIONS):
        if option in ("PAN", "PRI", "MORENA"):
            continue
        chance = {INDEPENDENT: 0.2, COALITION: 0.75}.get(option, 0.8)
        runs[i] = rng.random() < chance
    coalition = OPTIONS.index(COALITION)
    runs[coalition] = runs[coalition] and runs[OPTIONS.index("PRD")]
    shares = tuple(
        share * rng.lognormvariate(0.0, 0.35) if run else 0.0
        for share, run in zip(BASE_SHARE, runs)
    )
    return _Municipality(muni_id, name, tuple(runs), shares, rng.uniform(0.36, 0.52))


_Casilla = tuple[int, int, str, int, int, bool, int]
"""(municipality id, section, kind, number, ext, rural, lista nominal)."""


def _draw_casillas(
    rng: random.Random, muni_id: int, population: int, first_section: int
) -> list[_Casilla]:
    """The casillas of one municipality, section by section (B, C1.., E with contiguas, S)."""
    target = 3 + round(population / 1000 * 1.17 * rng.uniform(0.95, 1.05))
    rural_share = 0.15 if population > 100_000 else 0.4 if population > 20_000 else 0.8
    casillas: list[_Casilla] = []
    section = first_section
    while len(casillas) < target:
        rural = rng.random() < rural_share
        nominal = rng.randint(60, 900) if rural else rng.randint(450, 2_800)
        if rural and rng.random() < 0.08:
            parts = [("E", 1, ext) for ext in range(rng.randint(1, 3))]
        else:
            count = math.ceil(nominal / 750)
            parts = [("B", 1, 0)] + [("C", n, 0) for n in range(1, count)]
        for kind, number, ext in parts:
            casillas.append((muni_id, section, kind, number, ext, rural, nominal // len(parts)))
        section += 1
    for number in range(1, 1 + (population // 200_000 + 1 if population > 60_000 else 0)):
        host = rng.choice([c for c in casillas if not c[5]] or casillas)
        casillas.append((muni_id, host[1], "S", number, 0, False, 0))
    return sorted(casillas, key=lambda c: (c[1], c[2], c[3], c[4]))


def _draw_acta(rng: random.Random, muni: _Municipality, casilla: _Casilla) -> _Acta:
    """The votes, problems and capture details of one casilla's acta."""
    _, section, kind, number, ext, rural, nominal = casilla
    reps = rng.randint(0, 10)
    if kind == "S":
        voters, ballots = rng.randint(60, 650), 750
    else:
        turnout = muni.turnout + (0.06 if rural else 0.0) + rng.gauss(0.0, 0.07)
        voters, ballots = round(nominal * min(0.9, max(0.12, turnout))), nominal
    votes = _split_votes(rng, muni, voters + reps)
    problem = _draw_problem(rng)
    if problem == EXCEEDS:
        limit = ballots + reps
        votes[votes.index(max(votes))] += limit - sum(votes) + rng.randint(5, 60)
    unreadable = _draw_unreadable(rng, muni, problem)
    return _Acta(
        municipality=muni.id,
        section=section,
        kind=kind,
        number=number,
        ext=ext,
        rural=rural,
        nominal=nominal,
        reps=reps,
        sobrantes=max(0, ballots + 10 - voters - reps),
        votes=tuple(votes),
        problem=problem,
        unreadable=unreadable,
        written_delta=rng.choice((-3, -1, 1, 2, 5)) if rng.random() < 0.02 else 0,
        delay=rng.random(),
        capture_lag=rng.randint(5, 400),
        gather_lag=rng.randint(3, 70),
        transfer=rng.choices(("D", "F", "I"), (0.6, 0.25, 0.15))[0],
        origin="CASILLA" if rng.random() < 0.3 else "CATD",
    )


def _split_votes(rng: random.Random, muni: _Municipality, total: int) -> list[int]:
    """``total`` votes over :data:`VOTE_COLUMNS`, around the municipality's leaning."""
    null = round(total * rng.uniform(0.01, 0.045))
    unregistered = 1 if rng.random() < 0.15 else 0
    valid = max(0, total - null - unregistered)
    weights = [share * rng.lognormvariate(0.0, 0.3) for share in muni.shares]
    scale = valid / sum(weights)
    votes = [math.floor(w * scale) for w in weights]
    votes[weights.index(max(weights))] += valid - sum(votes)
    return [*votes, unregistered, null]


def _draw_problem(rng: random.Random) -> str:
    """The OBSERVACIONES of an acta: mostly none."""
    roll = rng.random()
    for problem, limit in ((NO_ACTA, 0.006), (ALL_ILLEGIBLE, 0.011), (EXCEEDS, 0.013)):
        if roll < limit:
            return problem
    return SOME_ILLEGIBLE if roll < 0.063 else ""


def _draw_unreadable(
    rng: random.Random, muni: _Municipality, problem: str
) -> tuple[tuple[int, str], ...]:
    """One or two unreadable vote cells of an acta with :data:`SOME_ILLEGIBLE`."""
    if problem != SOME_ILLEGIBLE:
        return ()
    running = [i for i, runs in enumerate(muni.options) if runs] + [len(OPTIONS) + 1]
    cells = rng.sample(running, rng.randint(1, 2))
    return tuple((i, rng.choice(("Ilegible", "Sin dato"))) for i in sorted(cells))


# --- one cut ----------------------------------------------------------------------------


def captured_count(sim: Simulation, total: int, sequence: int, final: bool = False) -> int:
    """Actas captured by cut ``sequence``: a saturating curve; all of them on the final cut."""
    if final:
        return total
    share = 1.0 - math.pow(0.5, sequence / sim.half_life_cuts)
    return min(total - 1, math.floor(total * share))


@dataclass
class _Tally:
    """Counts and votes of a set of actas (a municipality or the whole state)."""

    expected: int = 0
    captured: int = 0
    counted: int = 0
    inconsistent: int = 0
    nominal: int = 0
    votes: list[int] = field(default_factory=lambda: [0] * len(VOTE_COLUMNS))
    total: int = 0
    total_no_special: int = 0

    def add(self, acta: _Acta) -> None:
        """Count a captured acta."""
        self.captured += 1
        self.inconsistent += acta.problem != ""
        if not acta.counted:
            return
        self.counted += 1
        self.nominal += acta.nominal
        blank = {i for i, _ in acta.unreadable}
        for i, value in enumerate(acta.votes):
            if i not in blank:
                self.votes[i] += value
        computed = _computed_total(acta)
        self.total += computed
        self.total_no_special += 0 if acta.kind == "S" else computed

    def percent(self, part: int) -> str:
        return f"{100 * part / self.expected:.4f}" if self.expected else "0.0000"

    def participation(self) -> str:
        return f"{100 * self.total / self.nominal:.4f}" if self.nominal else "0.0000"


def _computed_total(acta: _Acta) -> int:
    blank = {i for i, _ in acta.unreadable}
    return sum(v for i, v in enumerate(acta.votes) if i not in blank)


@dataclass(frozen=True)
class _Cut:
    """What one cut shows: its captured actas with their verification times."""

    sim: Simulation
    sequence: int
    cut_time: datetime
    final: bool
    election: _Election
    captured: tuple[tuple[_Acta, datetime], ...]
    """Captured actas in CLAVE order, each with its FECHA_HORA_VERIFICACION."""
    out_of_catalog: int

    @property
    def stamp(self) -> str:
        return cut_stamp(self.cut_time)

    def tallies(self) -> tuple[_Tally, dict[int, _Tally]]:
        """The state's tally and each municipality's."""
        state = _Tally(expected=len(self.election.actas))
        per = {m.id: _Tally() for m in self.election.municipalities}
        for acta in self.election.actas:
            per[acta.municipality].expected += 1
        for acta, _ in self.captured:
            state.add(acta)
            per[acta.municipality].add(acta)
        return state, per


def cut_stamp(cut_time: datetime) -> str:
    """The PREP cut stamp of line 2: ``DD/MM/YYYY HH:MM (UTC-6)``, in ``cut_time``'s offset.

    Raises ValueError if ``cut_time`` is naive.
    """
    offset = cut_time.utcoffset()
    if offset is None:
        raise ValueError("cut_time must be timezone-aware")
    minutes = int(offset.total_seconds()) // 60
    sign, minutes = ("-" if minutes < 0 else "+"), abs(minutes)
    zone = (
        f"{sign}{minutes // 60}"
        if minutes % 60 == 0
        else f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"
    )
    return f"{cut_time:%d/%m/%Y %H:%M} (UTC{zone})"


def _make_cut(sim: Simulation, sequence: int, cut_time: datetime, final: bool) -> _Cut:
    """Select the actas captured by cut ``sequence`` and date their capture."""
    if sequence < 1:
        raise ValueError(f"sequence must be at least 1, not {sequence}")
    cut_stamp(cut_time)
    election = _election(sim)
    total = len(election.actas)
    counts = [captured_count(sim, total, s) for s in range(1, sequence)]
    counts.append(max(counts[-1:] + [captured_count(sim, total, sequence, final)]))
    period = timedelta(seconds=sim.period_seconds)
    captured = []
    first = 0
    for cut_index, count in enumerate(counts):
        for acta in election.actas[first:count]:
            back = (len(counts) - 1 - cut_index) * period + acta.delay * period
            captured.append((acta, cut_time - back))
        first = max(first, count)
    captured.sort(key=lambda item: item[0].clave_casilla)
    return _Cut(sim, sequence, cut_time, final, election, tuple(captured), min(3, sequence // 4))


def build_cut(
    sim: Simulation, sequence: int, cut_time: datetime, out: Path, final: bool = False
) -> None:
    """Write the publication tree of cut ``sequence`` into the new folder ``out``.

    The tree: ``index.html`` (state totals and the table of municipalities),
    ``municipios/<id>.html``, the CSS and logo (identical in every cut), the PREP
    database ``datos/COAH_AYUN_2021.csv`` and the delivery zip
    ``datos/YYYYMMDD_HHMM_PREP_AYUN_COAH.zip`` (CSV and ``LEEME.txt``), both
    stamped with ``cut_time`` in its own offset. Raises ``Error`` if ``out``
    exists and ValueError if ``cut_time`` is naive or ``sequence`` < 1.
    """
    cut = _make_cut(sim, sequence, cut_time, final)
    try:
        out.mkdir(parents=True)
    except FileExistsError:
        raise Error(f"cut folder {out} already exists") from None
    csv_data = _csv_bytes(cut)
    files = {
        CSS_PATH: STYLESHEET.encode(),
        LOGO_PATH: LOGO_SVG.encode(),
        CSV_PATH: csv_data,
        zip_path(cut_time): _zip_bytes(cut_time, csv_data),
        **_pages(cut),
    }
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)


def zip_path(cut_time: datetime) -> str:
    """Path of a cut's delivery zip, named by its cut minute in ``cut_time``'s offset."""
    return f"datos/{cut_time:%Y%m%d_%H%M}_PREP_AYUN_COAH.zip"


# --- the CSV and the zip ----------------------------------------------------------------


def _csv_bytes(cut: _Cut) -> bytes:
    """The PREP database in the real layout: UTF-8 with BOM, LF line ends."""
    state, _ = cut.tallies()
    summary = (
        state.expected,
        state.captured + cut.out_of_catalog,
        cut.out_of_catalog,
        state.captured,
        state.percent(state.captured),
        state.counted,
        state.percent(state.counted),
        state.percent(state.inconsistent),
        state.captured - state.counted,
        state.nominal,
        state.total,
        state.total_no_special,
        state.participation(),
    )
    buffer = io.StringIO()
    buffer.write(f"\ufeffAYUNTAMIENTOS\n{cut.stamp}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SUMMARY_HEADER)
    writer.writerow(summary)
    buffer.write("\n")
    writer.writerow(ACTA_HEADER)
    names = {m.id: m for m in cut.election.municipalities}
    for acta, verified in cut.captured:
        writer.writerow(_acta_row(acta, names[acta.municipality], verified, cut.sim.seed))
    for index in range(cut.out_of_catalog):
        writer.writerow(_out_of_catalog_row(cut, index))
    return buffer.getvalue().encode("utf-8")


def _timestamp(moment: datetime) -> str:
    return f"{moment:%d/%m/%Y %H:%M:%S}"


def _acta_row(acta: _Acta, muni: _Municipality, verified: datetime, seed: int) -> list[str]:
    """One row of the per-acta table."""
    captured = verified - timedelta(seconds=acta.capture_lag)
    gathered = (captured - timedelta(minutes=acta.gather_lag)).replace(second=0)
    scanned = acta.problem != NO_ACTA
    image = hashlib.sha256(f"{seed}:{acta.clave_acta}".encode()).hexdigest() if scanned else ""
    return [
        acta.clave_casilla,
        acta.clave_acta,
        STATE_ID,
        STATE_NAME,
        f"{acta.municipality:03d}",
        muni.upper,
        f"{acta.section:04d}",
        f"{acta.number:02d}",
        acta.kind,
        f"{acta.ext:02d}",
        "2" if acta.rural else "1",
        acta.acta_type,
        *_count_cells(acta),
        *_vote_cells(acta, muni),
        str(acta.nominal),
        str(acta.reps),
        acta.problem,
        "1" if acta.counted else "0",
        acta.transfer,
        image,
        _timestamp(gathered),
        _timestamp(captured),
        _timestamp(verified),
        acta.origin,
        "MOVIL" if acta.origin == "CASILLA" else "ESCANER",
        "ACTA PREP",
    ]


def _count_cells(acta: _Acta) -> list[str]:
    """TOTAL_BOLETAS_SOBRANTES .. TOTAL_VOTOS_SACADOS."""
    if acta.problem in (NO_ACTA, ALL_ILLEGIBLE):
        return ["0"] * 4
    voters = sum(acta.votes) - acta.reps
    return [str(acta.sobrantes), str(voters), str(acta.reps), str(voters + acta.reps)]


def _vote_cells(acta: _Acta, muni: _Municipality) -> list[str]:
    """The vote columns, TOTAL_VOTOS_ASENTADO and TOTAL_VOTOS_CALCULADO."""
    runs = [*muni.options, True, True]
    if acta.problem in (NO_ACTA, ALL_ILLEGIBLE):
        fill = "-" if acta.problem == NO_ACTA else "Ilegible"
        return [fill if r else "-" for r in runs] + [fill, fill]
    cells = [str(v) if r else "-" for v, r in zip(acta.votes, runs)]
    for i, text in acta.unreadable:
        cells[i] = text
    computed = _computed_total(acta)
    return [*cells, str(max(0, computed + acta.written_delta)), str(computed)]


def _out_of_catalog_row(cut: _Cut, index: int) -> list[str]:
    """An acta whose identification matches no approved casilla."""
    seen = 4 * (index + 1)
    gathered = cut.cut_time - (cut.sequence - seen + 0.4) * timedelta(
        seconds=cut.sim.period_seconds
    )
    image = hashlib.sha256(f"{cut.sim.seed}:fuera:{index}".encode()).hexdigest()
    dashes = ["-"] * (len(ACTA_HEADER) - 14)
    when = _timestamp(gathered.replace(second=0))
    tail = [OUT_OF_CATALOG, "0", "-", image, when, "-", "-", "CATD", "ESCANER", "ACTA PREP"]
    return ["-", "-", STATE_ID, STATE_NAME, *dashes, *tail]


def _zip_bytes(cut_time: datetime, csv_data: bytes) -> bytes:
    """The delivery zip: the CSV stamped with the cut minute, and the LEEME."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data, when in (
            ("LEEME.txt", LEEME.encode("utf-8"), (2021, 5, 3, 10, 0, 0)),
            (CSV_NAME, csv_data, cut_time.timetuple()[:6]),
        ):
            info = zipfile.ZipInfo(name, date_time=when)  # type: ignore[arg-type]
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            archive.writestr(info, data)
    return buffer.getvalue()


# --- the web pages ----------------------------------------------------------------------


def _pages(cut: _Cut) -> dict[str, bytes]:
    """``index.html`` and one page per municipality."""
    state, per = cut.tallies()
    pages = {"index.html": _index_page(cut, state, per)}
    for muni in cut.election.municipalities:
        actas = [(a, t) for a, t in cut.captured if a.municipality == muni.id]
        pages[f"municipios/{muni.id}.html"] = _municipality_page(cut, muni, per[muni.id], actas)
    return {path: text.encode("utf-8") for path, text in pages.items()}


def _label(option: str) -> str:
    return OPTION_LABELS.get(option, option)


def _number(value: int) -> str:
    return f"{value:,}"


def _page(cut: _Cut, title: str, body: str, root: str) -> str:
    """A complete page: header with logo and cut time, then ``body``."""
    kind = "Corte final" if cut.final else "Corte de información"
    stamp = cut.stamp.replace(" (", " h (")
    return (
        '<!doctype html>\n<html lang="es-MX">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)} · PREP Coahuila 2021 (simulación)</title>\n"
        f'<link rel="stylesheet" href="{root}{CSS_PATH}">\n</head>\n<body>\n'
        f'<header><a href="{root}index.html"><img src="{root}{LOGO_PATH}" alt="PREP" '
        'width="120" height="40"></a>\n<div><p class="eleccion">Programa de Resultados '
        "Electorales Preliminares · Coahuila 2021 · Ayuntamientos</p>\n"
        f'<p class="corte">{kind}: <strong>{stamp}</strong></p></div></header>\n'
        '<p class="aviso">Simulación con datos ficticios para pruebas del difusor; '
        "no son resultados oficiales.</p>\n<main>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}</main>\n</body>\n</html>\n"
    )


def _progress(tally: _Tally) -> str:
    """The actas and participation summary of a tally."""
    return (
        '<dl class="avance">\n'
        f"<dt>Actas capturadas</dt><dd>{_number(tally.captured)} de "
        f"{_number(tally.expected)} esperadas ({tally.percent(tally.captured)} %)</dd>\n"
        f"<dt>Actas contabilizadas</dt><dd>{_number(tally.counted)} "
        f"({tally.percent(tally.counted)} %)</dd>\n"
        f"<dt>Participación ciudadana</dt><dd>{tally.participation()} %</dd>\n</dl>\n"
    )


def _votes_table(tally: _Tally, runs: Sequence[bool]) -> str:
    """Votes per option, candidacies not registered, null votes and the total."""
    rows = []
    for i, column in enumerate(VOTE_COLUMNS):
        if i < len(OPTIONS) and not runs[i]:
            continue
        label = {"NO_REGISTRADOS": "Candidaturas no registradas", "NULOS": "Votos nulos"}.get(
            column, _label(column)
        )
        share = 100 * tally.votes[i] / tally.total if tally.total else 0.0
        rows.append(
            f"<tr><th>{html.escape(label)}</th><td>{_number(tally.votes[i])}</td>"
            f"<td>{share:.4f} %</td></tr>"
        )
    rows.append(
        f'<tr class="total"><th>Total</th><td>{_number(tally.total)}</td><td>100 %</td></tr>'
    )
    return (
        '<table class="votos">\n<thead><tr><th>Partido, coalición o candidatura</th>'
        "<th>Votos</th><th>Porcentaje</th></tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody>\n</table>\n"
    )


def _leader(tally: _Tally) -> str:
    """The option ahead in a tally, or a dash while nothing is counted."""
    votes = tally.votes[: len(OPTIONS)]
    if not any(votes):
        return "—"
    return _label(OPTIONS[votes.index(max(votes))])


def _index_page(cut: _Cut, state: _Tally, per: dict[int, _Tally]) -> str:
    """The entry page: state totals and the table of municipalities."""
    rows = "\n".join(
        f'<tr><td>{m.id}</td><td><a href="municipios/{m.id}.html">{html.escape(m.name)}</a></td>'
        f"<td>{_number(per[m.id].expected)}</td><td>{_number(per[m.id].captured)}</td>"
        f"<td>{per[m.id].percent(per[m.id].captured)} %</td>"
        f"<td>{_number(per[m.id].counted)}</td><td>{html.escape(_leader(per[m.id]))}</td></tr>"
        for m in cut.election.municipalities
    )
    body = (
        _progress(state)
        + "<h2>Votos en el estado</h2>\n"
        + _votes_table(state, [True] * len(OPTIONS))
        + '<h2>Municipios</h2>\n<table class="municipios">\n<thead><tr><th>Clave</th>'
        "<th>Municipio</th><th>Actas esperadas</th><th>Actas capturadas</th>"
        "<th>Porcentaje</th><th>Actas contabilizadas</th><th>Primer lugar</th></tr></thead>\n"
        f"<tbody>\n{rows}\n</tbody>\n</table>\n"
        "<h2>Base de datos</h2>\n<ul>\n"
        f'<li><a href="{CSV_PATH}">{CSV_NAME}</a> (CSV, UTF-8)</li>\n'
        f'<li><a href="{zip_path(cut.cut_time)}">{zip_path(cut.cut_time)[6:]}</a> '
        "(CSV y LEEME en zip)</li>\n</ul>\n"
    )
    return _page(cut, "Ayuntamientos: resultados en el estado", body, "")


def _municipality_page(
    cut: _Cut, muni: _Municipality, tally: _Tally, actas: list[tuple[_Acta, datetime]]
) -> str:
    """A municipality's totals and its captured actas, casilla by casilla."""
    columns = [i for i, runs in enumerate([*muni.options, True, True]) if runs]
    head = "".join(f"<th>{html.escape(VOTE_COLUMNS[i])}</th>" for i in columns)
    rows = []
    for acta, _ in actas:
        cells = _vote_cells(acta, muni)
        votes = "".join(f"<td>{html.escape(cells[i])}</td>" for i in columns)
        state = "Contabilizada" if acta.counted else "No contabilizada"
        note = f" ({acta.problem.capitalize()})" if acta.problem else ""
        rows.append(
            f"<tr><td>{acta.section:04d}</td><td>{acta.kind}{acta.number}"
            f"{'-' + str(acta.ext) if acta.ext else ''}</td>{votes}<td>{cells[-1]}</td>"
            f"<td>{state}{html.escape(note)}</td></tr>"
        )
    body = (
        _progress(tally)
        + _votes_table(tally, muni.options)
        + f'<h2>Actas capturadas ({_number(len(actas))})</h2>\n<table class="actas">\n'
        f"<thead><tr><th>Sección</th><th>Casilla</th>{head}<th>Total</th><th>Estado del acta</th>"
        f"</tr></thead>\n<tbody>\n{chr(10).join(rows)}\n</tbody>\n</table>\n"
        '<p><a href="../index.html">Volver a los resultados del estado</a></p>\n'
    )
    return _page(cut, f"{muni.id}. {muni.name}", body, "../")


STYLESHEET = """\
body { margin: 0; font-family: system-ui, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; }
header { display: flex; gap: 1.5rem; align-items: center; padding: .75rem 1.5rem;
  background: #5b2c6f; color: #fff; }
header p { margin: .15rem 0; }
.aviso { margin: 0; padding: .4rem 1.5rem; background: #fff3cd; font-size: .9rem; }
main { padding: 1rem 1.5rem 3rem; max-width: 72rem; }
h1 { font-size: 1.5rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; }
dl.avance { display: grid; grid-template-columns: max-content auto; gap: .25rem 1rem; }
dl.avance dt { font-weight: 600; }
dl.avance dd { margin: 0; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid #ddd; text-align: right; }
th:first-child, td:nth-child(2) { text-align: left; }
thead th { background: #f2eef5; }
tr.total th, tr.total td { font-weight: 700; }
table.actas { display: block; overflow-x: auto; }
"""
"""The site's stylesheet (identical in every cut)."""

LOGO_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40" viewBox="0 0 120 40">
<rect width="120" height="40" rx="6" fill="#ffffff"/>
<rect x="8" y="14" width="22" height="18" rx="2" fill="#5b2c6f"/>
<rect x="14" y="6" width="10" height="12" fill="#ffffff" stroke="#5b2c6f" stroke-width="2"/>
<text x="38" y="28" font-family="sans-serif" font-size="20" font-weight="700" \
fill="#5b2c6f">PREP</text>
</svg>
"""
"""The site's logo (identical in every cut)."""

LEEME = """\
PREP Coahuila 2021, Ayuntamientos: instructivo del archivo CSV (SIMULACIÓN)

Este paquete es parte de una simulación con datos ficticios. Los nombres de los
municipios son reales; las casillas, los votos y las actas son inventados.

Contenido
- COAH_AYUN_2021.csv: base de datos del PREP al corte de información.

Estructura del archivo CSV (UTF-8, separado por comas)
Renglón 1: nombre de la elección.
Renglón 2: fecha y hora del corte de información, con su huso horario (UTC-6).
Renglón 3: encabezados del resumen; renglón 4: sus valores.
  ACTAS_ESPERADAS: actas de todas las casillas aprobadas.
  ACTAS_REGISTRADAS: actas registradas en el sistema, incluidas las fuera de catálogo.
  ACTAS_FUERA_CATALOGO: actas registradas que no corresponden a una casilla aprobada.
  ACTAS_CAPTURADAS: actas esperadas registradas al momento del corte.
  ACTAS_CONTABILIZADAS: actas capturadas cuyos datos se suman a los resultados.
  PORCENTAJE_ACTAS_INCONSISTENCIAS: actas con algún dato ilegible, sin dato o que
    excede la lista nominal, respecto de las esperadas.
  TOTAL_VOTOS_C_CS / TOTAL_VOTOS_S_CS: votos de las actas contabilizadas, con y sin
    casillas especiales.
  PORCENTAJE_PARTICIPACION_CIUDADANA: votos respecto de la lista nominal de las
    actas contabilizadas.
Renglón 5: vacío.
Renglón 6: encabezados de la tabla de actas; después, un renglón por acta registrada.
  CLAVE_CASILLA: ID_ESTADO, SECCION, TIPO_CASILLA, ID_CASILLA y EXT_CONTIGUA.
  CLAVE_ACTA: CLAVE_CASILLA seguida del tipo de acta.
  TIPO_CASILLA: B básica, C contigua, E extraordinaria, S especial.
  UBICACION_CASILLA: 1 urbana, 2 no urbana.
  PAN ... FXM, CAND_IND_1, C_PRI_PRD: votos por partido, candidatura independiente
    y combinaciones de la coalición; "-" donde no hay candidatura.
  NO_REGISTRADOS, NULOS: votos por candidaturas no registradas y votos nulos.
  TOTAL_VOTOS_ASENTADO: total escrito en el acta; TOTAL_VOTOS_CALCULADO: suma que
    hace el sistema.
  OBSERVACIONES: ALGÚN CAMPO ILEGIBLE O SIN DATO, TODOS ILEGIBLES O SIN DATO,
    EXCEDE LISTA NOMINAL, SIN ACTA POR PAQUETE NO ENTREGADO, FUERA DE CATÁLOGO.
  CONTABILIZADA: 1 sí, 0 no.
  MECANISMOS_TRASLADO: D, F o I, según el mecanismo de traslado del paquete.
  SHA: código de integridad (SHA-256) de la imagen del acta.
  FECHA_HORA_ACOPIO, FECHA_HORA_CAPTURA, FECHA_HORA_VERIFICACION: DD/MM/AAAA HH:MM:SS.
  ORIGEN: CATD o CASILLA; DIGITALIZACION: ESCANER o MOVIL.
"""
"""The LEEME.txt of the delivery zip (identical in every cut)."""


# --- the institute ----------------------------------------------------------------------


def _last_sequence(outdir: Path) -> int:
    """The highest cut folder (``NNNNNN``) in ``outdir``, 0 if none."""
    numbers = [int(p.name) for p in outdir.iterdir() if re.fullmatch(r"\d{6,}", p.name)]
    return max(numbers, default=0)


def _prune(outdir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest cut folders."""
    folders = sorted(
        (p for p in outdir.iterdir() if re.fullmatch(r"\d{6,}", p.name)), key=lambda p: int(p.name)
    )
    for folder in folders[:-keep] if keep > 0 else []:
        shutil.rmtree(folder, ignore_errors=True)


def run_institute(
    sim: Simulation,
    key: sshkeys.PrivateKey,
    outdir: Path,
    deliver: Callable[[Path], None],
    interval: float,
    cuts: int,
    stop: threading.Event,
    clock: Clock = now_utc6,
    final: bool = False,
    keep: int = KEEP_CUTS,
) -> None:
    """Build, sign and deliver one cut every ``interval`` seconds.

    Cut folders are ``outdir/NNNNNN``; the sequence continues after the highest
    one already there. The cut time is ``clock()`` in UTC-6 truncated to the
    minute (never before the previous cut's). Stops when ``stop`` is set or
    after ``cuts`` cuts (0: never); with ``final`` the last of them is the
    final cut. Raises what building, signing
    or ``deliver`` raise.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    sequence = _last_sequence(outdir)
    made = 0
    latest: datetime | None = None
    while not stop.is_set():
        sequence += 1
        made += 1
        last = cuts > 0 and made >= cuts
        # A clock stepped back must not make a cut older than the last (spec §4.4).
        now = latest = max(
            clock().astimezone(OFFSET), latest or datetime.min.replace(tzinfo=OFFSET)
        )
        cut_time = now.replace(second=0, microsecond=0)
        folder = outdir / f"{sequence:06d}"
        build_cut(sim, sequence, cut_time, folder, final=final and last)
        info = CutInfo(
            sim.election,
            sequence,
            cut_time.isoformat(),
            final=final and last,
            period_seconds=sim.period_seconds,
            signed_at=now.isoformat(timespec="seconds"),
        )
        sign_folder(folder, key, info)
        deliver(folder)
        _prune(outdir, keep)
        if last:
            return
        stop.wait(interval)


class _Deliverer:
    """The delivery of ``prep-agent simulate``: local or SFTP, reporting each cut."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.previous: Path | None = None

    def __call__(self, folder: Path) -> None:
        args = self.args
        try:
            if args.inbox:
                deliver_local(folder, Path(args.inbox))
            else:
                identity = Path(args.identity) if args.identity else None
                deliver_sftp(folder, args.sftp, identity, args.port, previous=self.previous)
        except (Error, OSError) as exc:
            self.previous = None  # upload everything next time
            print(f"institute: cut {int(folder.name)} not delivered: {exc}", file=sys.stderr)
            return
        self.previous = folder
        print(f"institute: delivered cut {int(folder.name)}", flush=True)


def main(args: argparse.Namespace) -> int:
    """``prep-agent simulate``: run the simulated institute; return the exit status.

    Raises ``Error`` (bad key, folder) for the command line to report.
    """
    if bool(args.inbox) == bool(args.sftp):
        raise Error("give exactly one of --inbox DIR and --sftp USER@HOST:DIR")
    if args.sftp:
        split_target(args.sftp)
    if args.interval <= 0 or args.cuts < 0:
        raise Error("--interval must be positive and --cuts at least 0")
    key = load_key(Path(args.key))
    sim = Simulation(seed=args.seed)
    stop = threading.Event()
    try:
        run_institute(
            sim,
            key,
            Path(args.out),
            _Deliverer(args),
            args.interval,
            args.cuts,
            stop,
            final=args.final,
        )
    except KeyboardInterrupt:
        print("institute: stopped", flush=True)
    return 0
