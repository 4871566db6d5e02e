"""The fault schedule of a rehearsal: a small text file, one fault a line.

Each line is ``CUT KIND [DIFUSOR]``: the fault is injected once cut number
``CUT`` (1-based) of the night was placed; ``#`` starts a comment. Kinds:

- ``kill-agent D``: SIGKILL the agent of D while it takes the cut, restart it
  one period later; expected: the cut (or a newer one) published after restart.
- ``disk-full D``: fill D's storage (a small tmpfs, root only) for two periods;
  expected: the failed upload recorded by ``distribute``, then recovery.
- ``network-cut D``: D is cut off from the institute (as root its namespace's
  institute link goes down; on loopback its sshd and sessions are stopped
  with SIGSTOP) for ``unlink_periods`` + 1 periods at least, and until its
  frame showed the interruption notice; expected: flagged and dropped from
  the good-standing list by the collector, the notice shown to readers, then
  listed again.
- ``bad-signature``: a cut signed by a key the institute does not trust;
  expected: ``distribute`` refuses it, every difusor rejects it.
- ``replay``: the previous cut uploaded again; expected: ``distribute``
  refuses it, every difusor rejects it (rollback).
- ``tamper D``: a defect, not a fault: a file of D's published copy is changed
  on disk; expected: the collector's audit finds the copy altered (and the
  verdict fails, since viewers were shown bytes the institute did not sign).
- ``notice-off D``: a defect: D's agent is configured (before the night) with
  ``stale_periods = 1000``, so it never shows the interruption notice;
  expected: a viewer finds the notice missing once one is due (pair it with a
  ``network-cut D``), and the verdict fails.
- ``clock-skew D``: D's agent runs with its wall clock 900 s behind
  (libfaketime, for that process only; ``skew.py``) until the collector
  refused its health reports and it rejected a cut as from its future, then
  with the right clock; expected: both refusals, then the next cut published.
  Not available without Debian's ``faketime``.
- ``balancer-kill``: the HA pair's active balancer loses keepalived, Varnish
  and HAProxy to SIGKILL; expected: the other one takes the floating address,
  readers see no error after the measured failover window.
- ``origin-stop``: the pair's first origin's agent stopped three periods at
  least, then started; expected: HAProxy and the collector notice, readers of
  the pair see no error, the origin catches up.
  Both need the HA pair (namespace mode): else reported as not available.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prep_agent.core.errors import ConfigError

WITH_DIFUSOR = {"kill-agent", "disk-full", "network-cut", "tamper", "notice-off", "clock-skew"}
"""Kinds aimed at one difusor."""
GLOBAL = {"bad-signature", "replay", "balancer-kill", "origin-stop"}
"""Kinds aimed at the whole night."""
NOT_AVAILABLE: dict[str, str] = {}
"""Kinds this build reports without injecting them, and why (English, for the JSON)."""

DEFAULT = """\
# CUT KIND [DIFUSOR]  (prep-agent rehearse --faults FILE)
2 kill-agent a
3 bad-signature
2 network-cut b
4 replay
4 disk-full c
3 origin-stop
5 clock-skew a
5 balancer-kill
"""
"""The default schedule: every kind once (the HA ones need the pair: namespace mode)."""


@dataclass(frozen=True)
class Fault:
    """One scheduled fault."""

    at_cut: int
    kind: str
    difusor: str | None


def parse(text: str, difusores: tuple[str, ...], cuts: int) -> list[Fault]:
    """The faults of a schedule, in cut order.

    Raises ConfigError naming the line of an unknown kind, a missing or unknown
    difusor, or a cut outside 1..``cuts``.
    """
    faults = []
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        where = f"fault schedule line {number}"
        if len(words) not in (2, 3) or not words[0].isdigit():
            raise ConfigError(f"{where}: expected CUT KIND [DIFUSOR], got {raw.strip()!r}")
        at_cut, kind = int(words[0]), words[1]
        target = words[2] if len(words) == 3 else None
        if kind not in WITH_DIFUSOR | GLOBAL:
            raise ConfigError(f"{where}: unknown fault kind {kind!r}")
        if kind in WITH_DIFUSOR and target not in difusores:
            raise ConfigError(f"{where}: {kind} needs one of the difusores {', '.join(difusores)}")
        if kind in GLOBAL and target is not None:
            raise ConfigError(f"{where}: {kind} takes no difusor")
        if not 1 <= at_cut <= cuts:
            raise ConfigError(f"{where}: cut {at_cut} is outside 1..{cuts}")
        faults.append(Fault(at_cut, kind, target))
    return sorted(faults, key=lambda f: f.at_cut)


def load(path: Path | None, difusores: tuple[str, ...], cuts: int) -> list[Fault]:
    """The schedule in ``path`` (None: the default one, clipped to ``cuts``).

    Raises ConfigError when the file cannot be read or a line is wrong.
    """
    if path is None:
        lines = [
            ln for ln in DEFAULT.splitlines() if not ln[:1].isdigit() or int(ln.split()[0]) <= cuts
        ]
        return parse("\n".join(lines), difusores, cuts)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the fault schedule {path}: {exc.strerror}") from None
    return parse(text, difusores, cuts)
