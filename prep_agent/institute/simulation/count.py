"""The count at one cut: which actas it shows, when they were verified, their tallies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prep_agent.institute.simulation.election import (
    VOTE_COLUMNS,
    Acta,
    Election,
    Simulation,
    draw_election,
)


def captured_count(sim: Simulation, total: int, sequence: int, final: bool = False) -> int:
    """Actas captured by cut ``sequence``: a saturating curve; all of them on the final cut."""
    if final:
        return total
    share = 1.0 - math.pow(0.5, sequence / sim.half_life_cuts)
    return min(total - 1, math.floor(total * share))


@dataclass
class Tally:
    """Counts and votes of a set of actas (a municipality or the whole state)."""

    expected: int = 0
    captured: int = 0
    counted: int = 0
    inconsistent: int = 0
    nominal: int = 0
    votes: list[int] = field(default_factory=lambda: [0] * len(VOTE_COLUMNS))
    total: int = 0
    total_no_special: int = 0

    def add(self, acta: Acta) -> None:
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
        computed = computed_total(acta)
        self.total += computed
        self.total_no_special += 0 if acta.kind == "S" else computed

    def percent(self, part: int) -> str:
        """``part`` as a percentage of the expected actas, four decimals."""
        return f"{100 * part / self.expected:.4f}" if self.expected else "0.0000"

    def participation(self) -> str:
        """Votes counted as a percentage of their lista nominal, four decimals."""
        return f"{100 * self.total / self.nominal:.4f}" if self.nominal else "0.0000"


def computed_total(acta: Acta) -> int:
    """TOTAL_VOTOS_CALCULADO: the sum of an acta's readable vote cells."""
    blank = {i for i, _ in acta.unreadable}
    return sum(v for i, v in enumerate(acta.votes) if i not in blank)


@dataclass(frozen=True)
class Cut:
    """What one cut shows: its captured actas with their verification times."""

    sim: Simulation
    sequence: int
    cut_time: datetime
    final: bool
    election: Election
    captured: tuple[tuple[Acta, datetime], ...]
    """Captured actas in CLAVE order, each with its FECHA_HORA_VERIFICACION."""
    out_of_catalog: int

    @property
    def stamp(self) -> str:
        """The cut stamp of :func:`cut_stamp`."""
        return cut_stamp(self.cut_time)

    def tallies(self) -> tuple[Tally, dict[int, Tally]]:
        """The state's tally and each municipality's."""
        state = Tally(expected=len(self.election.actas))
        per = {m.id: Tally() for m in self.election.municipalities}
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


def make_cut(sim: Simulation, sequence: int, cut_time: datetime, final: bool) -> Cut:
    """Select the actas captured by cut ``sequence`` and date their capture.

    Raises ValueError if ``sequence`` < 1 or ``cut_time`` is naive.
    """
    if sequence < 1:
        raise ValueError(f"sequence must be at least 1, not {sequence}")
    cut_stamp(cut_time)
    election = draw_election(sim)
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
    return Cut(sim, sequence, cut_time, final, election, tuple(captured), min(3, sequence // 4))
