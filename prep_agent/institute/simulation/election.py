"""The simulated election: Coahuila's municipalities, casillas, actas and votes.

Everything is drawn from ``Simulation.seed`` (the municipality names and
populations are real, the rest invented), in the order in which the actas will
be captured.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

STATE_ID = "05"
"""INE id of Coahuila de Zaragoza."""
STATE_NAME = "COAHUILA"

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

# Acta problems, with the OBSERVACIONES text of the real files.
SOME_ILLEGIBLE = "ALGÚN CAMPO ILEGIBLE O SIN DATO"
ALL_ILLEGIBLE = "TODOS ILEGIBLES O SIN DATO"
EXCEEDS = "EXCEDE LISTA NOMINAL"
NO_ACTA = "SIN ACTA POR PAQUETE NO ENTREGADO"
OUT_OF_CATALOG = "FUERA DE CATÁLOGO"
NOT_COUNTED = (ALL_ILLEGIBLE, EXCEEDS, NO_ACTA)
"""Problems that leave an acta out of the count (CONTABILIZADA 0)."""


@dataclass(frozen=True)
class Simulation:
    """A simulated PREP; every cut is a deterministic function of these fields."""

    election: str = "coah-ayun-2021"
    seed: int = 2021
    period_seconds: int = 600
    """Promised cadence (manifest ``period_seconds``); also spaces capture times."""
    half_life_cuts: float = 6.0
    """Cuts after which half of the actas are captured."""


@dataclass(frozen=True)
class Municipality:
    """A municipality: which options run there and how its voters lean."""

    id: int
    name: str
    options: tuple[bool, ...]
    """Per :data:`OPTIONS`: whether it has a candidacy here."""
    shares: tuple[float, ...]
    turnout: float

    @property
    def upper(self) -> str:
        """The name in capitals, as the PREP CSV writes it."""
        return self.name.upper()


@dataclass(frozen=True)
class Acta:
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
        """CLAVE_CASILLA: state, section, casilla kind and number, contigua."""
        return f"{STATE_ID}{self.section:04d}{self.kind}{self.number:02d}{self.ext:02d}"

    @property
    def acta_type(self) -> str:
        """TIPO_ACTA: ``2E`` for a casilla especial, else ``2``."""
        return "2E" if self.kind == "S" else "2"

    @property
    def clave_acta(self) -> str:
        """CLAVE_ACTA: CLAVE_CASILLA followed by the acta type."""
        return f"{self.clave_casilla}0{self.acta_type}"

    @property
    def counted(self) -> bool:
        """Whether its votes are counted (CONTABILIZADA 1)."""
        return self.problem not in NOT_COUNTED


@dataclass(frozen=True)
class Election:
    """The drawn election: its municipalities in INE order and all its actas."""

    municipalities: tuple[Municipality, ...]
    actas: tuple[Acta, ...]
    """In capture order."""


@functools.lru_cache(maxsize=4)
def draw_election(sim: Simulation) -> Election:
    """The catalogue of actas and their votes, drawn from ``sim.seed``."""
    rng = random.Random(sim.seed)
    municipalities = tuple(
        _draw_municipality(rng, i + 1, n) for i, (n, _) in enumerate(MUNICIPALITIES)
    )
    ranked: list[tuple[float, Acta]] = []
    section = 1
    for muni, (_, population) in zip(municipalities, MUNICIPALITIES):
        for casilla in _draw_casillas(rng, muni.id, population, section):
            section = max(section, casilla[1] + 1)
            acta = _draw_acta(rng, muni, casilla)
            ranked.append((rng.random() + (0.35 if acta.rural else 0.0), acta))
    ranked.sort(key=lambda item: item[0])
    return Election(municipalities, tuple(acta for _, acta in ranked))


def _draw_municipality(rng: random.Random, muni_id: int, name: str) -> Municipality:
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
    return Municipality(muni_id, name, tuple(runs), shares, rng.uniform(0.36, 0.52))


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


def _draw_acta(rng: random.Random, muni: Municipality, casilla: _Casilla) -> Acta:
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
    return Acta(
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


def _split_votes(rng: random.Random, muni: Municipality, total: int) -> list[int]:
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
    rng: random.Random, muni: Municipality, problem: str
) -> tuple[tuple[int, str], ...]:
    """One or two unreadable vote cells of an acta with :data:`SOME_ILLEGIBLE`."""
    if problem != SOME_ILLEGIBLE:
        return ()
    running = [i for i, runs in enumerate(muni.options) if runs] + [len(OPTIONS) + 1]
    cells = rng.sample(running, rng.randint(1, 2))
    return tuple((i, rng.choice(("Ilegible", "Sin dato"))) for i in sorted(cells))
