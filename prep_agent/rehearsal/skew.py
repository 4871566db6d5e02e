"""The ``clock-skew`` fault: one difusor's agent runs with its wall clock
``SKEW`` seconds behind everyone else's, then with the right clock again.

The skew is real for that process only: libfaketime (Debian's ``faketime``) as
``LD_PRELOAD`` of the agent alone, with ``FAKETIME=-SKEW`` and the monotonic
clock left alone (a faked monotonic clock stalls Python's timed waits). Before
counting on it, the agent's own ``/health`` ``time`` is read back: a skew that
did not take is a failed fault, never a passed one.

What the specs expect of a clock 900 s behind: health-v1 §3 (the collector
accepts a report only if its ``time`` is within ±300 s of its own clock), so
the collector refuses every push of that difusor (``time-window``); and
prep-cut-v1 §4.4 (``signed_at`` ≤ now + ``max_clock_skew``, 300 s), so the
agent rejects each new cut as from its future (``time-invalid``).
"""

from __future__ import annotations

import glob
import json
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prep_agent.rehearsal.viewer import fetch

if TYPE_CHECKING:
    from prep_agent.rehearsal.inject import Injection
    from prep_agent.rehearsal.stand import Difusor, Stand

SKEW = 900
"""Seconds the skewed agent's clock is behind: three times both specs' 300 s bounds."""
LIBRARY_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
)
"""Where Debian's ``faketime`` package puts the thread-safe library (the agent runs threads)."""
TOLERANCE = 60.0
"""How far the agent's clock may be from the intended skew for the fault to count as made."""
EXPECTED = (
    "the collector refuses the difusor's health reports (time outside ±300 s, health-v1 §3) "
    "and the agent rejects new cuts as from its future (time-invalid, prep-cut-v1 §4.4); "
    "with its clock right again it publishes the next cut"
)


def library() -> str | None:
    """The path of libfaketime's thread-safe library (None: not installed)."""
    for pattern in LIBRARY_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def unavailable() -> str | None:
    """Why the fault cannot be made here (None: it can)."""
    if library() is None:
        return "libfaketime (Debian package faketime) is not installed"
    return None


def wrapper(lib: str, skew: int = SKEW) -> list[str]:
    """The command prefix that runs a program with its wall clock ``skew`` s behind."""
    return [
        "env",
        f"LD_PRELOAD={lib}",
        f"FAKETIME=-{skew}",
        "FAKETIME_DONT_FAKE_MONOTONIC=1",
        "FAKETIME_DONT_RESET=1",
    ]


def agent_offset(d: Difusor, tries: int = 10) -> float | None:
    """The difusor's clock minus ours, from its ``/health`` ``time`` (None: no readable
    answer in ``tries`` looks, one a second)."""
    for _ in range(tries):
        code, body = fetch(d.url + "/health")
        try:
            stamp = json.loads(body)["time"] if code in (200, 503) else None
            if stamp is not None:
                moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
                return moment.timestamp() - time.time()
        except (ValueError, KeyError, TypeError):
            pass
        time.sleep(1)
    return None


def refused_reports(stand: Stand, service_id: str, since: float) -> float | None:
    """When the collector last refused a push of ``service_id`` for its time, if after
    ``since`` (None: not seen)."""
    code, body = fetch(stand.collector_url + "/api/difusores")
    if code != 200:
        return None
    rows: list[dict[str, Any]] = json.loads(body).get("rejections", [])
    for row in rows:
        if row.get("reason") == "time-window" and row.get("serviceId") == service_id:
            last = float(row.get("last_ts") or 0)
            if last >= since:
                return last
    return None


def run(inj: Injection) -> None:
    """Skew the agent's clock until both refusals are seen (at least one period, at most
    ``6 x period + 20`` s), then restart it with the right clock and wait for a newer cut.
    """
    from prep_agent.rehearsal.inject import published, refused, until

    d, period, lib = inj.difusor(), inj.period, library()
    assert d.agent is not None and lib is not None
    d.agent.stop()
    when = inj._inject(
        f"agent of {d.service_id} restarted with its clock {SKEW} s behind "
        f"(LD_PRELOAD={lib}, FAKETIME=-{SKEW})"
    )
    d.start_agent(wrapper=wrapper(lib))
    offset = agent_offset(d)
    inj.record["agent_clock_offset"] = None if offset is None else round(offset, 1)
    if offset is None or abs(offset + SKEW) > TOLERANCE:
        inj.record["detail"] += (
            f"; libfaketime did not skew the agent's clock (its /health time is {offset} s off,"
            f" not -{SKEW})"
        )
    else:
        seen: dict[str, float] = {}

        def both() -> bool:
            if "collector" not in seen and refused_reports(inj.stand, d.service_id, when):
                seen["collector"] = time.time()
            agent_time = [
                e for e in refused(d, when - SKEW - 60) if e.get("reason") == "time-invalid"
            ]
            if "agent" not in seen and agent_time:
                seen["agent"] = time.time()
            return len(seen) == 2 and time.time() >= when + period

        until(both, 6 * period + 20, inj.stop)
        inj.record["refused_by"] = sorted(seen)
        if len(seen) == 2:
            inj._detected(
                max(seen.values()),
                "collector (reports refused: time outside ±300 s) and agent (cut rejected: "
                "time-invalid)",
            )
        else:
            missing = {"collector", "agent"} - set(seen)
            inj.record["detail"] += f"; not seen: {', '.join(sorted(missing))}"
    d.agent.stop()
    d.start_agent()
    restored = time.time()
    newest = max(inj.placed)
    back = until(
        lambda: [s for s in published(d, restored) if s >= newest], 6 * period + 30, inj.stop
    )
    if not back:
        inj.record["detail"] += f"; no cut from {newest} on published after the clock was right"
        inj.record["detected_at"] = None
    inj.record["window"] = [when, time.time()]
