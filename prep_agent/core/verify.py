"""The pure verification core: decide whether a delivered cut is acceptable.

``decide(manifest_bytes, sig_bytes, policy, published, now)`` covers
prep-cut-v1 §2, §3 and §4.1–§4.4 with no I/O and an injected clock. The
per-file checks of §4.5–§4.7 need the bytes and live in ``publish``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from prep_agent.core import sshsig
from prep_agent.core.allowed_signers import AllowedSigner
from prep_agent.core.errors import (
    EQUIVOCATION,
    LIMIT_EXCEEDED,
    ROLLBACK,
    SIGNATURE_MALFORMED,
    SIGNATURE_UNTRUSTED,
    TIME_INVALID,
    WRONG_ELECTION,
    Rejection,
    SignatureFormatError,
)
from prep_agent.core.manifest import Limits, Manifest, parse_manifest
from prep_agent.core.protocol import NAMESPACE_CUT

MAX_SIGNATURE_BYTES = 1024**2
"""Upper bound on the .sig file: far above any threshold of real signers."""


@dataclass(frozen=True)
class Policy:
    """What the agent is configured to trust and accept."""

    election: str
    signers: tuple[AllowedSigner, ...]
    threshold: int = 1
    max_clock_skew: timedelta = timedelta(seconds=300)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Published:
    """What is published now and the highest sequence ever accepted."""

    sequence: int | None = None
    cut_time: datetime | None = None
    highest_sequence: int = 0
    highest_manifest_sha256: str | None = None


@dataclass(frozen=True)
class Decision:
    """An authentic, acceptable cut (or a replay of the published one)."""

    manifest: Manifest
    manifest_sha256: str
    signers: tuple[str, ...]
    already_published: bool = False


def check_signatures(
    manifest_bytes: bytes, sig_bytes: bytes, policy: Policy, now: datetime
) -> tuple[str, ...]:
    """§3: return the fingerprints of the distinct trusted keys that signed.

    Raises ``Rejection`` (SIGNATURE_MALFORMED or SIGNATURE_UNTRUSTED), transient
    because a half-uploaded cut looks just like this.
    """
    if len(sig_bytes) > MAX_SIGNATURE_BYTES:
        raise Rejection(LIMIT_EXCEEDED, f"signature file of {len(sig_bytes)} bytes", True)
    try:
        blocks = sshsig.parse_armored(sig_bytes)
    except SignatureFormatError as exc:
        raise Rejection(SIGNATURE_MALFORMED, str(exc), transient=True) from None
    result = sshsig.count_trusted(blocks, manifest_bytes, policy.signers, NAMESPACE_CUT, now)
    if len(result.keys) < policy.threshold:
        why = "; ".join(result.reasons) or "no block"
        raise Rejection(
            SIGNATURE_UNTRUSTED,
            f"signed by {len(result.keys)}/{policy.threshold} required trusted keys ({why})",
            transient=True,
        )
    return tuple(k.fingerprint() for k in result.keys)


def check_order(manifest: Manifest, digest: str, published: Published) -> bool:
    """§4.3 and the cut_time order of §4.4; True when it is a replay (no-op).

    Raises ``Rejection`` (ROLLBACK, EQUIVOCATION or TIME_INVALID).
    """
    highest = published.highest_sequence
    if manifest.sequence == highest:
        if digest == published.highest_manifest_sha256:
            return True
        raise Rejection(EQUIVOCATION, f"sequence {highest} already accepted with other bytes")
    if manifest.sequence < highest:
        raise Rejection(ROLLBACK, f"sequence {manifest.sequence} < accepted {highest}")
    if published.cut_time is not None and manifest.cut_time < published.cut_time:
        raise Rejection(
            TIME_INVALID,
            f"cut_time {manifest.cut_time_text} is older than the published "
            f"{published.cut_time.isoformat()}",
        )
    return False


def check_clock(manifest: Manifest, policy: Policy, now: datetime) -> None:
    """§4.4: nothing from the future, and signed no earlier than the cut.

    Raises ``Rejection(TIME_INVALID)``.
    """
    limit = now + policy.max_clock_skew
    if manifest.cut_time > limit:
        raise Rejection(TIME_INVALID, f"cut_time {manifest.cut_time_text} is in the future")
    if manifest.signed_at > limit:
        raise Rejection(
            TIME_INVALID, f"signed_at {manifest.signed_at.isoformat()} is in the future"
        )
    if manifest.signed_at < manifest.cut_time:
        raise Rejection(TIME_INVALID, "signed_at is before cut_time")


def decide(
    manifest_bytes: bytes,
    sig_bytes: bytes,
    policy: Policy,
    published: Published,
    now: datetime,
) -> Decision:
    """Decide a delivered cut from its manifest and signature bytes (§2–§4.4).

    The signature is checked before the manifest is parsed, so unsigned bytes
    are never interpreted. Raises ``Rejection``.
    """
    if len(manifest_bytes) > policy.limits.max_manifest_bytes:
        raise Rejection(LIMIT_EXCEEDED, f"manifest of {len(manifest_bytes)} bytes")
    signers = check_signatures(manifest_bytes, sig_bytes, policy, now)
    manifest = parse_manifest(manifest_bytes, policy.limits)
    if manifest.election != policy.election:
        raise Rejection(
            WRONG_ELECTION, f"election {manifest.election!r} is not {policy.election!r}"
        )
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    replay = check_order(manifest, digest, published)
    if not replay:
        check_clock(manifest, policy, now)
    return Decision(manifest, digest, signers, already_published=replay)
