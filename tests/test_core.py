"""The pure core: ``verify.decide`` with an injected clock, manifest rules, freshness."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from prep_agent.core import sshkeys, sshsig
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.core.errors import Rejection
from prep_agent.core.freshness import CURRENT, FINAL, NO_CUT, STALE, freshness
from prep_agent.core.manifest import Limits, parse_manifest, parse_rfc3339
from prep_agent.core.verify import Policy, Published, decide

pytestmark = pytest.mark.core

KEY = Ed25519PrivateKey.generate()
CUT = datetime(2021, 6, 6, 20, 30, tzinfo=timezone(timedelta(hours=-5)))
POLICY = Policy(
    election="coah-ayun-2021",
    signers=tuple(parse_allowed_signers(f"iec {sshkeys.public_key_of(KEY).openssh()}\n")),
)


def doc(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "format": "prep-cut/1",
        "election": "coah-ayun-2021",
        "sequence": 5,
        "cut_time": "2021-06-06T20:30:00-05:00",
        "signed_at": "2021-06-06T20:31:00-05:00",
        "entry": "index.html",
        "files": [{"path": "index.html", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}],
    }
    base.update(changes)
    return base


def signed(d: dict[str, Any]) -> tuple[bytes, bytes]:
    data = json.dumps(d).encode()
    return data, sshsig.armor(sshsig.sign(KEY, data, "prep-cut"))


def test_accepts_at_injected_time() -> None:
    data, sig = signed(doc())
    decision = decide(data, sig, POLICY, Published(), CUT + timedelta(minutes=2))
    assert decision.manifest.sequence == 5
    assert decision.manifest.cut_time == CUT
    assert decision.manifest_sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(("skew", "ok"), [(300, True), (301, False)])
def test_clock_skew_boundary(skew: int, ok: bool) -> None:
    """cut_time and signed_at may be at most max_clock_skew ahead of our clock."""
    data, sig = signed(doc(signed_at="2021-06-06T20:30:00-05:00"))
    now = CUT - timedelta(seconds=skew)
    if ok:
        decide(data, sig, POLICY, Published(), now)
    else:
        with pytest.raises(Rejection, match="time-invalid"):
            decide(data, sig, POLICY, Published(), now)


def test_key_validity_uses_verification_time_not_signed_at() -> None:
    public = sshkeys.public_key_of(KEY).openssh()
    data, sig = signed(doc())  # signed_at 2021-06-07 01:31 UTC
    for valid_after, now, ok in [
        ("202106070100Z", CUT + timedelta(minutes=2), True),
        ("202106070200Z", CUT + timedelta(minutes=2), False),
        ("202106070200Z", CUT + timedelta(minutes=31), True),
    ]:
        signers = parse_allowed_signers(f'iec valid-after="{valid_after}" {public}\n')
        policy = Policy(election="coah-ayun-2021", signers=tuple(signers))
        if ok:
            decide(data, sig, policy, Published(), now)
        else:
            with pytest.raises(Rejection, match="signature-untrusted"):
                decide(data, sig, policy, Published(), now)


def test_signature_checked_before_manifest_is_parsed() -> None:
    """Unsigned garbage is reported as a signature problem, never parsed."""
    _, sig = signed(doc())
    with pytest.raises(Rejection, match="signature-untrusted"):
        decide(b"{not json", sig, POLICY, Published(), CUT)


def test_published_order() -> None:
    data, sig = signed(doc())
    digest = hashlib.sha256(data).hexdigest()
    now = CUT + timedelta(minutes=2)
    same = Published(5, CUT, 5, digest)
    assert decide(data, sig, POLICY, same, now).already_published
    with pytest.raises(Rejection, match="equivocation"):
        decide(data, sig, POLICY, Published(5, CUT, 5, "0" * 64), now)
    with pytest.raises(Rejection, match="rollback"):
        decide(data, sig, POLICY, Published(6, CUT, 6, "0" * 64), now)
    with pytest.raises(Rejection, match="time-invalid"):
        decide(data, sig, POLICY, Published(4, CUT + timedelta(seconds=1), 4, None), now)


@pytest.mark.parametrize(
    "text",
    ["2021-06-06T20:30:00Z", "2021-06-06t20:30:00.123456789-05:00", "2021-06-06T20:30:00+00:00"],
)
def test_rfc3339_accepted(text: str) -> None:
    assert parse_rfc3339(text, "cut_time").tzinfo is not None


@pytest.mark.parametrize(
    "text",
    [
        "2021-06-06T20:30:00",
        "2021-06-06 20:30:00-05:00",
        "2021-06-06T20:30-05:00",
        "2021-13-06T20:30:00Z",
        "2021-06-06T20:30:00-0500",
        "2021-06-06T20:30:00-24:00",
        1622999400,
    ],
)
def test_rfc3339_rejected(text: object) -> None:
    with pytest.raises(Rejection, match="manifest-invalid"):
        parse_rfc3339(text, "cut_time")


@pytest.mark.parametrize(
    "changes",
    [
        {"election": "Coah"},
        {"election": "-coah"},
        {"election": "a" * 65},
        {"period_seconds": 3601},
        {"final": "true"},
        {"notice": {"level": "warn", "text": "x"}},
        {"notice": {"level": "info"}},
        {"files": []},
        {"files": {}},
        {"sequence": 0},
        {"sequence": -1},
    ],
)
def test_manifest_rules(changes: dict[str, Any]) -> None:
    with pytest.raises(Rejection, match="manifest-invalid"):
        parse_manifest(json.dumps(doc(**changes)).encode(), Limits())


def test_manifest_limits() -> None:
    data = json.dumps(doc()).encode()
    with pytest.raises(Rejection, match="limit-exceeded"):
        parse_manifest(data, Limits(max_file_bytes=2))
    with pytest.raises(Rejection, match="limit-exceeded"):
        parse_manifest(data, Limits(max_cut_bytes=2))
    with pytest.raises(Rejection, match="limit-exceeded"):
        parse_manifest(data, Limits(max_manifest_bytes=len(data) - 1))


def test_freshness() -> None:
    m = parse_manifest(json.dumps(doc(period_seconds=600)).encode(), Limits())
    assert freshness(None, CUT, 3) == NO_CUT
    assert freshness(m, CUT + timedelta(minutes=30), 3) == CURRENT
    assert freshness(m, CUT + timedelta(minutes=30, seconds=1), 3) == STALE
    final = parse_manifest(json.dumps(doc(final=True)).encode(), Limits())
    assert freshness(final, CUT + timedelta(days=3), 3) == FINAL
