"""``prep-agent rehearse`` as root in network namespaces: each difusor's sshd and
agent in a namespace of their own, on the institute's and the readers' private
switches; the network cut is a real link down (``ip link set inst0 down``) for
3+ periods, during which the cut-off difusor's frame must show the interruption
notice to readers, then up again. The HA pair (two origins behind the shipped
HAProxy/Varnish/keepalived configs, read through the floating address) runs
too, with every fault kind: its active balancer killed, one origin stopped, a
difusor's clock skewed (libfaketime). Needs root and iproute2 (the Debian leg).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from prep_agent.rehearsal.browser import unavailable
from prep_agent.rehearsal.netns import available
from tests.test_rehearse import check_load, rehearse
from tests.test_rehearse_ha import check_pair_and_every_fault

pytestmark = pytest.mark.edge


def test_night_in_namespaces_cuts_a_real_link_and_shows_the_notice(tmp_path: Path) -> None:
    why = available()
    if why:
        pytest.skip(why)
    out = tmp_path / "ensayo"
    proc, doc = rehearse(out, "--cuts", "8", "--period", "2", "--mode", "netns")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert doc["verdict"] == "pass" and doc["options"]["mode"] == "netns"
    urls = [d["url"] for d in doc["difusores"]]
    assert not any("127.0.0.1" in u for u in urls), urls
    kinds = {f["kind"]: f for f in doc["faults"]}
    cut_off = kinds["network-cut"]
    assert cut_off["status"] == "detected" and "inst0 down" in cut_off["detail"], cut_off
    assert cut_off["injected_at"] < cut_off["detected_at"] < cut_off["relinked_at"]
    assert cut_off["injected_at"] < cut_off["notice_shown_at"] <= cut_off["relinked_at"]
    start, end = cut_off["window"]
    assert end > start
    flagged = [s for s in doc["collector_timeline"] if s["difusores"]["b"]["unlink"]]
    assert flagged and not flagged[0]["difusores"]["b"]["listed"]
    assert doc["collector_timeline"][-1]["difusores"]["b"]["listed"]
    due = [n for n in doc["notices"]["b"] if n["due_at"] > cut_off["injected_at"]]
    assert due and due[0]["shown_at"], doc["notices"]
    if unavailable() is None:
        assert due[0]["shown_browser_at"], doc["notices"]
    last = doc["cuts"][-1]["difusores"]
    assert all(last[d]["published"] for d in last), last
    assert set(last) == {"a", "b", "c", "h1", "h2", "h"}
    check_pair_and_every_fault(doc, out)
    check_load(doc, {"a", "b", "c", "h"}, readers=25)  # the pair through its floating address
    # Through the floating address, every cut the pair published was seen unless it
    # was replaced within 1.5 s or shown only while its active balancer was down
    # (report.pair_unseen; a verdict problem otherwise); the final cut is seen too.
    unseen = doc["ha_pair"]["unseen"]
    assert all(u["excused"] for u in unseen), unseen
    missed = {c["sequence"] for c in doc["cuts"] if not c["difusores"]["h"]["first_seen"]}
    assert missed == {u["sequence"] for u in unseen}, (missed, unseen)
    assert doc["cuts"][-1]["difusores"]["h"]["first_seen"], unseen
    names = doc["options"]["namespaces"]
    assert len(names) == 9, names  # two switches, three difusores, two origins, two balancers
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in left], left
