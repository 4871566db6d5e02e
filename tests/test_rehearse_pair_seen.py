"""The rehearsal's rule for the HA pair's readers: every cut the pair published
must be seen through the floating address, unless it was replaced too soon to
be sure of it or it was the pair's newest within an excused window (a balancer
killed, before the pair first served a cut). Real report code on the records
of a two-cut night (tests/test_rehearse_ha.py); the namespace rehearsal
(tests/test_rehearse_netns.py) checks a real night against it.
"""

from __future__ import annotations

from typing import Any

import pytest

from prep_agent.rehearsal import report
from tests.test_rehearse_ha import balancer_kill, night

START = 1_000_000.0


def later(records: dict[str, Any], cuts: dict[int, float]) -> dict[str, Any]:
    """The night's records with the pair publishing ``cuts`` (sequence: seconds after
    the start), past the first seconds the pair is excused in (it was not ready)."""
    records["journals"]["h"] = {k: START + at for k, at in cuts.items()}
    records["placed"] = {k: START + at - 0.1 for k, at in cuts.items()}
    return records


@pytest.mark.core
def test_a_cut_the_pair_held_outside_every_excused_window_must_be_seen() -> None:
    records = later(night([], []), {1: 0.5, 2: 10})
    records["viewers"]["h"].first_seen = {1: START + 1}  # cut 2 (from +10 s) never seen
    doc = report.build(records)
    assert doc["verdict"] == "fail"
    assert [p for p in doc["problems"] if p.startswith("viewer of h: cut 2 never seen")]
    assert doc["ha_pair"]["unseen"] == [
        {"sequence": 2, "newest_seconds": 50.0, "excused": None}
    ]  # fmt: skip
    # A cut shown through the floating address (1.5 s after each swap: the purge)
    # only while the active balancer was killed is excused; 2 s of it outside is not.
    for kill_from, verdict in ((10.5, "pass"), (13.5, "fail")):
        faults = [balancer_kill(START + kill_from, START + 16)]
        records = later(night([], faults), {1: 0.5, 2: 10, 3: 13})
        records["viewers"]["h"].first_seen = {1: START + 1, 3: START + 17}
        doc = report.build(records)
        assert doc["verdict"] == verdict, (kill_from, doc["problems"])
        (unseen,) = doc["ha_pair"]["unseen"]
        assert unseen["sequence"] == 2 and (unseen["excused"] is None) == (verdict == "fail")


@pytest.mark.core
def test_a_cut_replaced_within_a_look_or_two_is_excused_and_one_held_longer_is_not() -> None:
    for until, verdict in ((1.0, "pass"), (2.0, "fail")):
        records = later(night([], []), {1: 0.5, 2: 10, 3: 10 + until})
        records["viewers"]["h"].first_seen = {1: START + 1, 3: START + 15}
        doc = report.build(records)
        assert doc["verdict"] == verdict, (until, doc["problems"])
        (unseen,) = doc["ha_pair"]["unseen"]
        assert unseen["sequence"] == 2 and unseen["newest_seconds"] == until
