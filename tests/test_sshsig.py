"""Tests of prep_agent.sshsig, mostly differential against the real ssh-keygen."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from prep_agent.core import sshkeys, sshsig
from prep_agent.core.allowed_signers import parse_allowed_signers
from prep_agent.core.errors import SignatureFormatError
from prep_agent.core.protocol import NAMESPACE_CUT
from tests.sshsig_openssh import (
    MESSAGE,
    NOW,
    SK_TYPE,
    Blob,
    KeyPair,
    dearmor,
    forge,
    generate,
    read_strings,
    rearmor,
    run_keygen,
    sk_ed25519,
    ssh_fingerprint,
    ssh_sign,
    ssh_string,
    ssh_verify_status,
)

ACCEPTED_KEYS = ["ed25519", "ecdsa256", "ecdsa384", "ecdsa521", "rsa3072", "rsa4096"]
HASHES = ["sha256", "sha512"]
KEY_SPECS = {
    "ed25519": ("ed25519", None),
    "ecdsa256": ("ecdsa", 256),
    "ecdsa384": ("ecdsa", 384),
    "ecdsa521": ("ecdsa", 521),
    "rsa3072": ("rsa", 3072),
    "rsa4096": ("rsa", 4096),
    "rsa2048": ("rsa", 2048),
    "dsa": ("dsa", None),
    "rogue": ("ed25519", None),
    "rogue256": ("ecdsa", 256),
    "ca": ("ed25519", None),
}


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    """Every key the tests use, generated once by ssh-keygen."""
    directory = tmp_path_factory.mktemp("keys")
    return {name: generate(directory, name, *spec) for name, spec in KEY_SPECS.items()}


@pytest.fixture(scope="session")
def signatures(
    keys: dict[str, KeyPair], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, str, str], bytes]:
    """ssh-keygen signatures of MESSAGE by (key, hash, namespace)."""
    directory = tmp_path_factory.mktemp("sign")
    out = {}
    for name in [*ACCEPTED_KEYS, "rsa2048", "rogue"]:
        for hashalg in HASHES:
            for namespace in ("prep-cut", "prep-health"):
                armored = ssh_sign(keys[name], MESSAGE, directory, namespace, hashalg)
                out[name, hashalg, namespace] = armored
    return out


def trusted_file(keys: dict[str, KeyPair], names: list[str], options: dict[str, str]) -> str:
    """An allowed_signers text trusting ``names``, with per-key options."""
    return "".join(keys[name].allowed_line(options.get(name, "")) + "\n" for name in names)


def our_decision(armored: bytes, message: bytes, allowed: str) -> tuple[bool, str]:
    """Whether the first block counts for us, and why not."""
    try:
        sig = sshsig.parse_armored(armored)[0]
    except SignatureFormatError as exc:
        return False, f"malformed: {exc}"
    signers = parse_allowed_signers(allowed)
    signer, reason = sshsig.check_signature(sig, message, signers, NAMESPACE_CUT, NOW)
    return signer is not None, reason


# --- the differential corpus -----------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One signature to decide: block, message and allowed_signers text."""

    armored: bytes
    message: bytes
    allowed: str


@dataclass(frozen=True)
class Inputs:
    """What a mutation starts from."""

    keys: dict[str, KeyPair]
    name: str
    hashalg: str
    armored: bytes
    other_namespace: bytes

    def case(
        self,
        armored: bytes | None = None,
        options: str = "",
        message: bytes = MESSAGE,
        trusted: list[str] = ACCEPTED_KEYS,
    ) -> Case:
        """A case trusting the ``trusted`` keys, ``options`` on the signer's line."""
        allowed = trusted_file(self.keys, trusted, {self.name: options})
        return Case(armored or self.armored, message, allowed)

    def mutated(self, **changes: object) -> Case:
        """A case whose blob has some fields changed (re-armored by the test)."""
        return self.case(rearmor(Blob.split(dearmor(self.armored)).with_(**changes).join()))

    def blob(self) -> bytes:
        """The binary blob."""
        return dearmor(self.armored)


def _flip_last_bit(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


def _others(name: str) -> list[str]:
    return [other for other in ACCEPTED_KEYS if other != name]


def _other_key(inputs: Inputs) -> bytes:
    index = ACCEPTED_KEYS.index(inputs.name)
    return inputs.keys[ACCEPTED_KEYS[(index + 1) % len(ACCEPTED_KEYS)]].public_blob()


def _other_hash(inputs: Inputs) -> bytes:
    return b"sha512" if inputs.hashalg == "sha256" else b"sha256"


COUNTS, IGNORED, MALFORMED = "counts", "does not count", "malformed"

# name -> (builds the case, our outcome); ssh-keygen must exit 0 exactly for COUNTS
MUTATIONS: dict[str, tuple[Callable[[Inputs], Case], str]] = {
    "valid": (lambda i: i.case(), COUNTS),
    "signature-bit-flip": (lambda i: i.case(rearmor(_flip_last_bit(i.blob()))), IGNORED),
    "message-bit-flip": (lambda i: i.case(message=_flip_last_bit(MESSAGE)), IGNORED),
    "message-empty": (lambda i: i.case(message=b""), IGNORED),
    "wrong-namespace": (lambda i: i.case(i.other_namespace), IGNORED),
    "untrusted-key": (lambda i: i.case(trusted=_others(i.name)), IGNORED),
    "truncated": (lambda i: i.case(rearmor(i.blob()[:-1])), MALFORMED),
    "trailing-data": (lambda i: i.case(rearmor(i.blob() + b"\x00")), MALFORMED),
    "trailing-string": (lambda i: i.case(rearmor(i.blob() + b"\x00\x00\x00\x00")), MALFORMED),
    "version-2": (lambda i: i.mutated(version=2), MALFORMED),
    "hash-unknown": (lambda i: i.mutated(hashalg=b"sha384"), MALFORMED),
    "hash-label-swapped": (lambda i: i.mutated(hashalg=_other_hash(i)), IGNORED),
    "namespace-field-edited": (lambda i: i.mutated(namespace=b"prep-cut2"), IGNORED),
    "reserved-nonempty": (lambda i: i.mutated(reserved=b"future"), COUNTS),
    "embedded-key-swapped": (lambda i: i.mutated(key=_other_key(i)), IGNORED),
    "not-yet-valid": (lambda i: i.case(options='valid-after="20240601120001Z"'), IGNORED),
    "expired": (lambda i: i.case(options='valid-before="20240601115959Z"'), IGNORED),
    "window-one-second": (
        lambda i: i.case(options='valid-after="20240601120000Z",valid-before="20240601120001UTC"'),
        COUNTS,
    ),
    "window-inside": (
        lambda i: i.case(options='valid-after="20240601",valid-before="202406011200Z"'),
        COUNTS,
    ),
    "namespaces-excludes": (lambda i: i.case(options='namespaces="prep-health"'), IGNORED),
    "namespaces-pattern": (lambda i: i.case(options='namespaces="x,prep-*,!prep-h*"'), COUNTS),
    "namespaces-negated": (lambda i: i.case(options='namespaces="*,!prep-cut"'), IGNORED),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("hashalg", HASHES)
@pytest.mark.parametrize("name", ACCEPTED_KEYS)
def test_differential_against_ssh_keygen(
    keys: dict[str, KeyPair],
    signatures: dict[tuple[str, str, str], bytes],
    tmp_path: Path,
    name: str,
    hashalg: str,
    mutation: str,
) -> None:
    build, outcome = MUTATIONS[mutation]
    inputs = Inputs(
        keys,
        name,
        hashalg,
        signatures[name, hashalg, "prep-cut"],
        signatures[name, hashalg, "prep-health"],
    )
    case = build(inputs)
    status = ssh_verify_status(
        case.allowed, keys[name].principal, case.armored, case.message, tmp_path
    )
    counts, reason = our_decision(case.armored, case.message, case.allowed)
    ours = COUNTS if counts else MALFORMED if reason.startswith("malformed:") else IGNORED
    assert (status == 0) is (outcome == COUNTS), f"ssh-keygen exit {status}"
    assert ours == outcome, reason


def test_time_window_edges_are_inclusive(keys: dict[str, KeyPair], signatures, tmp_path) -> None:
    armored = signatures["ed25519", "sha512", "prep-cut"]
    for options in ('valid-after="20240601120000Z"', 'valid-before="20240601120000Z"'):
        allowed = keys["ed25519"].allowed_line(options) + "\n"
        assert (
            ssh_verify_status(allowed, keys["ed25519"].principal, armored, MESSAGE, tmp_path) == 0
        )
        assert our_decision(armored, MESSAGE, allowed) == (True, "")


@pytest.mark.parametrize(
    ("tz", "local_tz", "expected"),
    [("UTC", timezone.utc, True), ("Etc/GMT+6", ZoneInfo("Etc/GMT+6"), False)],
)
def test_time_without_z_is_local_time(
    keys: dict[str, KeyPair], signatures, tmp_path: Path, tz: str, local_tz, expected: bool
) -> None:
    """08:00 local is 08:00Z in UTC but 14:00Z at UTC-6, after NOW (12:00Z)."""
    armored = signatures["ed25519", "sha512", "prep-cut"]
    allowed = keys["ed25519"].allowed_line('valid-after="202406010800"') + "\n"
    status = ssh_verify_status(
        allowed, keys["ed25519"].principal, armored, MESSAGE, tmp_path, tz=tz
    )
    assert (status == 0) is expected
    sig = sshsig.parse_armored(armored)[0]
    signers = parse_allowed_signers(allowed, local_tz=local_tz)
    signer, _ = sshsig.check_signature(sig, MESSAGE, signers, NAMESPACE_CUT, NOW)
    assert (signer is not None) is expected


# --- where we are stricter than ssh-keygen -----------------------------------------


def _stricter_case(
    keys: dict[str, KeyPair], signatures, tmp_path: Path, kind: str
) -> tuple[bytes, str, str]:
    """(armored, allowed_signers, principal) that ssh-keygen accepts and we must not."""
    if kind.startswith("rsa2048"):
        key = keys["rsa2048"]
        return (
            signatures["rsa2048", kind.split("-")[1], "prep-cut"],
            key.allowed_line(),
            key.principal,
        )
    if kind == "dsa":
        key = keys["dsa"]
        return ssh_sign(key, MESSAGE, tmp_path), key.allowed_line(), key.principal
    if kind == "sk-ed25519":
        line, blob = sk_ed25519(keys["rogue"], MESSAGE)
        return rearmor(blob), f"inst-sk@iec.org.mx {line}", "inst-sk@iec.org.mx"
    if kind == "certificate":
        user, ca = generate(tmp_path, "user", "ed25519"), keys["ca"]
        args = ["-q", "-s", str(ca.path), "-I", "id", "-n", user.principal, f"{user.path}.pub"]
        assert run_keygen(args, tmp_path) == 0
        cert = base64.b64decode((tmp_path / "user-cert.pub").read_text().split()[1])
        allowed = f"{user.principal} cert-authority {ca.public_line}"
        return rearmor(forge(user, cert, MESSAGE)), allowed, user.principal
    assert kind == "version-0"
    blob = Blob.split(dearmor(signatures["ed25519", "sha512", "prep-cut"])).with_(version=0)
    return rearmor(blob.join()), keys["ed25519"].allowed_line(), keys["ed25519"].principal


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("rsa2048-sha256", "RSA key of 2048 bits < 3072"),
        ("rsa2048-sha512", "RSA key of 2048 bits < 3072"),
        ("dsa", "DSA keys are not allowed"),
        ("sk-ed25519", "security-key (sk-*) keys are not allowed"),
        ("certificate", "certificate keys (ssh-ed25519-cert-v01@openssh.com) are not allowed"),
        ("version-0", "malformed: block 1: malformed SSHSIG blob: version 0, expected 1"),
    ],
)
def test_stricter_than_ssh_keygen(
    keys: dict[str, KeyPair], signatures, tmp_path: Path, kind: str, reason: str
) -> None:
    armored, allowed, principal = _stricter_case(keys, signatures, tmp_path, kind)
    assert ssh_verify_status(allowed + "\n", principal, armored, MESSAGE, tmp_path) == 0
    assert our_decision(armored, MESSAGE, allowed) == (False, reason)


def test_sha1_rsa_signature_type_is_rejected(keys, signatures, tmp_path: Path) -> None:
    """An rsa-sha2 signature relabelled ssh-rsa: ssh-keygen refuses it too."""
    blob = Blob.split(dearmor(signatures["rsa3072", "sha512", "prep-cut"]))
    sig_type, raw = read_strings(blob.signature)
    assert sig_type == b"rsa-sha2-512"
    relabelled = ssh_string("ssh-rsa") + ssh_string(raw)
    armored = rearmor(blob.with_(signature=relabelled).join())
    allowed = keys["rsa3072"].allowed_line()
    assert ssh_verify_status(allowed, keys["rsa3072"].principal, armored, MESSAGE, tmp_path) != 0
    assert our_decision(armored, MESSAGE, allowed) == (
        False,
        "key type ssh-rsa signature (SHA-1) not allowed",
    )


# --- our signatures, armor, keys -----------------------------------------------------


@pytest.mark.parametrize("hashalg", HASHES)
@pytest.mark.parametrize("name", ACCEPTED_KEYS)
def test_ssh_keygen_accepts_our_signatures(
    keys: dict[str, KeyPair], tmp_path: Path, name: str, hashalg: str
) -> None:
    key = keys[name]
    private = sshkeys.load_private_key(key.private_bytes())
    blob = sshsig.sign(private, MESSAGE, NAMESPACE_CUT, hashalg)
    assert sshkeys.public_key_of(private) == sshkeys.parse_public_key(key.public_line)
    armored = sshsig.armor(blob)
    assert ssh_verify_status(key.allowed_line(), key.principal, armored, MESSAGE, tmp_path) == 0
    assert our_decision(armored, MESSAGE, key.allowed_line()) == (True, "")
    assert sshsig.parse_blob(blob).signature_type == (
        "rsa-sha2-512" if name.startswith("rsa") else key.public_line.split()[0]
    )


@pytest.mark.parametrize("hashalg", HASHES)
@pytest.mark.parametrize("name", ACCEPTED_KEYS)
def test_armor_matches_ssh_keygen_and_fields_parse(
    keys: dict[str, KeyPair], signatures, tmp_path: Path, name: str, hashalg: str
) -> None:
    armored = signatures[name, hashalg, "prep-cut"]
    sig = sshsig.parse_armored(armored)[0]
    assert sshsig.armor(sig.blob) == armored
    assert sig.namespace == "prep-cut"
    assert sig.hash_algorithm == hashalg
    assert sig.public_key.openssh() == keys[name].public_line
    assert sig.public_key.fingerprint() == ssh_fingerprint(keys[name], tmp_path)


def test_load_private_key_rejects_bad_input(keys: dict[str, KeyPair], tmp_path: Path) -> None:
    encrypted = tmp_path / "enc"
    assert run_keygen(["-q", "-t", "ed25519", "-N", "secret", "-f", str(encrypted)], tmp_path) == 0
    for data in (encrypted.read_bytes(), keys["dsa"].private_bytes(), b"garbage", b""):
        with pytest.raises(SignatureFormatError):
            sshkeys.load_private_key(data)


def test_sign_rejects_bad_arguments(keys: dict[str, KeyPair]) -> None:
    private = sshkeys.load_private_key(keys["ed25519"].private_bytes())
    with pytest.raises(ValueError, match="hash algorithm"):
        sshsig.sign(private, MESSAGE, "prep-cut", "sha1")
    with pytest.raises(ValueError, match="namespace"):
        sshsig.sign(private, MESSAGE, "")


# --- trust ------------------------------------------------------------------------------


@pytest.mark.parametrize(("trusted", "rogue"), [("ed25519", "rogue"), ("ecdsa256", "rogue256")])
def test_embedded_trusted_key_signed_by_rogue_key_does_not_count(
    keys: dict[str, KeyPair], tmp_path: Path, trusted: str, rogue: str
) -> None:
    blob = forge(keys[rogue], keys[trusted].public_blob(), MESSAGE)
    allowed = trusted_file(keys, ACCEPTED_KEYS, {})
    assert (
        ssh_verify_status(allowed, keys[trusted].principal, rearmor(blob), MESSAGE, tmp_path) != 0
    )
    assert our_decision(rearmor(blob), MESSAGE, allowed) == (False, "signature does not verify")


def test_rogue_key_embedding_itself_is_not_trusted(keys: dict[str, KeyPair], signatures) -> None:
    sig = sshsig.parse_armored(signatures["rogue", "sha512", "prep-cut"])[0]
    signers = parse_allowed_signers(trusted_file(keys, ACCEPTED_KEYS, {}))
    signer, reason = sshsig.check_signature(sig, MESSAGE, signers, "prep-cut", NOW)
    assert signer is None
    assert reason == f"key {sig.public_key.fingerprint()} not in allowed_signers"


def test_check_signature_reasons(keys: dict[str, KeyPair], signatures) -> None:
    sig = sshsig.parse_armored(signatures["ed25519", "sha512", "prep-cut"])[0]
    fingerprint = sig.public_key.fingerprint()

    def reason(options: str, namespace: str = "prep-cut") -> str:
        signers = parse_allowed_signers(keys["ed25519"].allowed_line(options))
        return sshsig.check_signature(sig, MESSAGE, signers, namespace, NOW)[1]

    assert reason("") == ""
    assert reason("", "prep-health") == "namespace 'prep-cut' is not 'prep-health'"
    assert reason('namespaces="prep-health"') == f"namespace not allowed for key {fingerprint}"
    assert reason('valid-before="20240101Z"') == (
        f"key {fingerprint} not valid at 2024-06-01T12:00:00Z (valid-before 2024-01-01T00:00:00Z)"
    )
    with pytest.raises(ValueError, match="aware"):
        sshsig.check_signature(sig, MESSAGE, [], "prep-cut", NOW.replace(tzinfo=None))


def test_later_line_for_the_same_key_can_trust_it(keys: dict[str, KeyPair], signatures) -> None:
    sig = sshsig.parse_armored(signatures["ed25519", "sha512", "prep-cut"])[0]
    key = keys["ed25519"]
    text = key.allowed_line('namespaces="other"') + "\n" + key.allowed_line() + "\n"
    signers = parse_allowed_signers(text)
    assert sshsig.check_signature(sig, MESSAGE, signers, "prep-cut", NOW) == (signers[1], "")


def test_threshold_counts_distinct_keys(keys: dict[str, KeyPair], signatures) -> None:
    blocks = [
        signatures["ed25519", "sha512", "prep-cut"],
        signatures["ecdsa384", "sha256", "prep-cut"],
        signatures["ed25519", "sha256", "prep-cut"],  # same key again: counts once
        signatures["rogue", "sha512", "prep-cut"],
        rearmor(_flip_last_bit(dearmor(signatures["rsa4096", "sha512", "prep-cut"]))),
        signatures["rsa3072", "sha512", "prep-health"],
        signatures["rsa3072", "sha256", "prep-cut"],
    ]
    sigs = sshsig.parse_armored(b"".join(blocks))  # as signers concatenate them
    assert len(sigs) == len(blocks)
    signers = parse_allowed_signers(trusted_file(keys, ACCEPTED_KEYS, {}))
    result = sshsig.count_trusted(sigs, MESSAGE, signers, NAMESPACE_CUT, NOW)
    expected = [
        sshkeys.parse_public_key(keys[n].public_line) for n in ("ed25519", "ecdsa384", "rsa3072")
    ]
    assert result.keys == tuple(expected)
    assert result.reasons == (
        f"block 4: key {sigs[3].public_key.fingerprint()} not in allowed_signers",
        "block 5: signature does not verify",
        "block 6: namespace 'prep-health' is not 'prep-cut'",
    )


def test_one_malformed_block_rejects_the_file(signatures) -> None:
    good = signatures["ed25519", "sha512", "prep-cut"]
    bad = rearmor(dearmor(good) + b"x")
    with pytest.raises(SignatureFormatError, match="^block 3: .*trailing data"):
        sshsig.parse_armored(good + good + bad + good)


# --- armor parsing --------------------------------------------------------------------


def _body(armored: bytes) -> bytes:
    return armored.split(b"\n", 1)[1].rsplit(b"-----END", 1)[0]


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda a: a + b"\n\n  \t\n", id="trailing-whitespace"),
        pytest.param(lambda a: b"\n \n" + a, id="leading-whitespace"),
        pytest.param(
            lambda a: a.replace(b"\n", b"\r\n").replace(
                b"SIGNATURE-----\r\n", b"SIGNATURE-----\n", 1
            ),
            id="crlf-body",
        ),
        pytest.param(lambda a: a.rstrip(b"\n"), id="no-final-newline"),
    ],
)
def test_parse_armored_accepts(signatures, edit: Callable[[bytes], bytes]) -> None:
    armored = signatures["ed25519", "sha512", "prep-cut"]
    assert sshsig.parse_armored(edit(armored))[0].blob == dearmor(armored)


def _set_slack_bit(armored: bytes) -> bytes:
    """Set an unused low bit of the base64 character before the ``==`` padding."""
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    index = armored.index(b"==\n") - 1
    flipped = alphabet[alphabet.index(armored[index]) ^ 1]
    return armored[:index] + bytes([flipped]) + armored[index + 1 :]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(lambda a: b"", "no SSH SIGNATURE block", id="empty"),
        pytest.param(lambda a: b" \n\t", "no SSH SIGNATURE block", id="whitespace-only"),
        pytest.param(lambda a: b"x" + a, "outside", id="text-before"),
        pytest.param(lambda a: a + b"x\n", "outside", id="text-after"),
        pytest.param(lambda a: a.replace(b"-----\n", b"-----x", 2), "outside", id="text-after-end"),
        pytest.param(lambda a: a.split(b"-----END")[0], "missing END", id="no-end"),
        pytest.param(
            lambda a: a.replace(b"SIGNATURE-----\n", b"SIGNATURE-----\r\n", 1),
            "outside",
            id="crlf-header",
        ),
        pytest.param(lambda a: a.replace(b"=\n", b"\n"), "base64", id="missing-padding"),
        pytest.param(_set_slack_bit, "non-canonical", id="slack-bits"),
        pytest.param(lambda a: a.replace(b"\n", b"\n*", 2), "base64", id="bad-char"),
        pytest.param(lambda a: a.replace(b"\n", b"\n=", 2), "base64", id="inner-padding"),
        pytest.param(lambda a: a.replace(b"SSH SIG", b"SSH SIF"), "outside", id="wrong-label"),
    ],
)
def test_parse_armored_rejects(signatures, edit: Callable[[bytes], bytes], message: str) -> None:
    armored = signatures["ed25519", "sha512", "prep-cut"]
    edited = edit(armored)
    assert edited != armored
    with pytest.raises(SignatureFormatError, match=message):
        sshsig.parse_armored(edited)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": 0}, "version 0"),
        ({"version": 2}, "version 2"),
        ({"hashalg": b"sha1"}, "hash algorithm 'sha1'"),
        ({"hashalg": b"SHA512"}, "hash algorithm 'SHA512'"),
        ({"namespace": b"prep\x00cut"}, "NUL"),
        ({"namespace": b"\xff"}, "UTF-8"),
        ({"key": b"\x00\x00\x00\x07ssh-foo"}, "unknown key type"),
        ({"key": b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x01x"}, "32 bytes"),
        ({"signature": b"\x00\x00\x00\x0bssh-ed25519"}, "truncated"),
        ({"signature": b"\x00\x00\x00\x01x\x00\x00\x00\x00\x00"}, "trailing"),
    ],
)
def test_parse_blob_rejects(signatures, changes: dict[str, object], message: str) -> None:
    blob = Blob.split(dearmor(signatures["ed25519", "sha512", "prep-cut"])).with_(**changes)
    with pytest.raises(SignatureFormatError, match=message):
        sshsig.parse_blob(blob.join())


def test_parse_blob_rejects_compressed_ecdsa_point(signatures) -> None:
    blob = Blob.split(dearmor(signatures["ecdsa256", "sha512", "prep-cut"]))
    curve_type, curve, point = read_strings(blob.key)
    compressed = bytes([2 + (point[-1] & 1)]) + point[1:33]
    key = b"".join(map(ssh_string, (curve_type, curve, compressed)))
    with pytest.raises(SignatureFormatError, match="uncompressed"):
        sshsig.parse_blob(blob.with_(key=key).join())


@pytest.mark.parametrize("name", ["ed25519", "ecdsa521", "rsa3072"])
def test_mangled_blobs_raise_only_format_errors(keys, signatures, tmp_path, name: str) -> None:
    """Random bit flips, cuts and insertions: parse or SignatureFormatError, never a crash.

    Any mangled blob that still counts must count for ssh-keygen too.
    """
    blob = dearmor(signatures[name, "sha512", "prep-cut"])
    signers_text = trusted_file(keys, ACCEPTED_KEYS, {})
    signers = parse_allowed_signers(signers_text)
    rng = random.Random(f"sshsig-{name}")
    counted = []
    for _ in range(400):
        data = bytearray(blob)
        position = rng.randrange(len(data))
        action = rng.choice(["flip", "cut", "insert", "length"])
        if action == "flip":
            data[position] ^= 1 << rng.randrange(8)
        elif action == "cut":
            del data[position:]
        elif action == "insert":
            data[position:position] = rng.randbytes(rng.randrange(1, 9))
        else:
            data[position : position + 4] = rng.randbytes(4)
        try:
            sig = sshsig.parse_blob(bytes(data))
        except SignatureFormatError:
            continue
        signer, _ = sshsig.check_signature(sig, MESSAGE, signers, "prep-cut", NOW)
        if signer is not None:
            counted.append(bytes(data))
    for data in counted:
        status = ssh_verify_status(
            signers_text, keys[name].principal, rearmor(data), MESSAGE, tmp_path
        )
        assert status == 0


# --- public keys ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ssh-ed25519",
        "ssh-ed25519 !!!!",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
        "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIEKjXHmLFvbm8ZZC2xqMkHyv9iV1S/Up48DBS2JfKazu",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEKjXHmLFvbm8ZZC2xqMkHyv9iV1S/Up48DBS2JfKazu=",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEKjXHmLFvbm8ZZC2xqMkHyv9iV1S/Up48DBS2JfKaz",
        "ssh-foo AAAAB3NzaC1mb28=",
    ],
)
@pytest.mark.core
def test_parse_public_key_rejects(text: str) -> None:
    with pytest.raises(SignatureFormatError):
        sshkeys.parse_public_key(text)


def test_parse_public_key_keeps_rejected_families(keys: dict[str, KeyPair]) -> None:
    dsa = sshkeys.parse_public_key(keys["dsa"].public_line + " comment here")
    assert dsa.key_type == "ssh-dss"
    line, _ = sk_ed25519(keys["rogue"], MESSAGE)
    assert sshkeys.parse_public_key(line).key_type == SK_TYPE


# --- allowed_signers --------------------------------------------------------------------

ED = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEKjXHmLFvbm8ZZC2xqMkHyv9iV1S/Up48DBS2JfKazu"
UTC = timezone.utc


@pytest.mark.parametrize(
    ("line", "principals", "namespaces", "after", "before"),
    [
        (f"a@x {ED}", ("a@x",), None, None, None),
        (f"  \ta@x,*@y.mx\t{ED} a comment", ("a@x", "*@y.mx"), None, None, None),
        (f'"a@x,b@x" {ED}', ("a@x", "b@x"), None, None, None),
        (f'a@x namespaces="prep-cut,prep-h*" {ED}', ("a@x",), ("prep-cut", "prep-h*"), None, None),
        (f'a@x NameSpaces="a \\"b\\"" {ED}', ("a@x",), ('a "b"',), None, None),
        (
            f'a@x valid-after="20240101",valid-before="20240102030405Z" {ED}',
            ("a@x",),
            None,
            datetime(2024, 1, 1, tzinfo=UTC),
            datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC),
        ),
        (
            f'a@x valid-before="202401020304utc" {ED}\r',
            ("a@x",),
            None,
            None,
            datetime(2024, 1, 2, 3, 4, tzinfo=UTC),
        ),
    ],
)
@pytest.mark.core
def test_allowed_signers_lines(line, principals, namespaces, after, before) -> None:
    (signer,) = parse_allowed_signers(f"# comment\n\n   \n{line}\n")
    assert signer.principals == principals
    assert signer.key == sshkeys.parse_public_key(ED)
    assert (signer.namespaces, signer.valid_after, signer.valid_before) == (
        namespaces,
        after,
        before,
    )


@pytest.mark.core
def test_allowed_signers_skips_cert_authority_lines() -> None:
    text = f'*@x cert-authority {ED}\n*@x namespaces="n",CERT-AUTHORITY {ED}\nb@x {ED}\n'
    assert [s.principals for s in parse_allowed_signers(text)] == [("b@x",)]


@pytest.mark.parametrize(
    ("principals", "principal", "expected"),
    [
        ("a@x", "a@x", True),
        ("a@x", "A@x", False),
        ("a@x", "a@xx", False),
        ("*@iec.org.mx", "inst@iec.org.mx", True),
        ("*@iec.org.mx,!bad@iec.org.mx", "bad@iec.org.mx", False),
        ("!bad@iec.org.mx,*@iec.org.mx", "good@iec.org.mx", True),
        ("!bad@iec.org.mx", "good@iec.org.mx", False),
        ("inst?@x", "inst1@x", True),
        ("inst?@x", "inst@x", False),
        ("*a*b*c", "xxaxxbxxc", True),
        ("*a*b*c", "xxaxxcxxb", False),
        ("[ab]@x", "a@x", False),
    ],
)
def test_principal_patterns(
    principals: str, principal: str, expected: bool, tmp_path, keys, signatures
) -> None:
    (signer,) = parse_allowed_signers(f"{principals} {ED}")
    assert signer.matches_principal(principal) is expected
    key = keys["ed25519"]
    allowed = f"{principals} {key.public_line}\n"
    status = ssh_verify_status(
        allowed, principal, signatures["ed25519", "sha512", "prep-cut"], MESSAGE, tmp_path
    )
    assert (status == 0) is expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a@x", "expected 'principals"),
        ('"a@x', "unterminated quote"),
        (f'"a@x"b {ED}', "after the quoted"),
        (f'a"@x {ED}', "stray quote"),
        (f'a@x foo="1" {ED}', "unknown option"),
        (f"a@x namespaces=prep-cut {ED}", "double quotes"),
        (f'a@x namespaces="prep-cut {ED}', "unterminated quote"),
        (f'a@x namespaces="a",namespaces="b" {ED}', "given twice"),
        (f'a@x namespaces="a", {ED}', "end with a comma"),
        (f'a@x valid-after="2024" {ED}', "bad time"),
        (f'a@x valid-after="20240231" {ED}', "no such date"),
        (f'a@x valid-after="19700101" {ED}', "not after 1970"),
        (f'a@x valid-after="20240102",valid-before="20240101" {ED}', "valid-before is not after"),
        ("a@x ssh-ed25519 AAAA", "malformed public key"),
        ("a@x ssh-ed25519", "malformed public key"),
    ],
)
@pytest.mark.core
def test_allowed_signers_malformed_line(line: str, message: str) -> None:
    with pytest.raises(SignatureFormatError, match=f"^allowed_signers line 3: .*{message}"):
        parse_allowed_signers(f"# header\n\n{line}\nb@x {ED}\n")


@pytest.mark.core
def test_local_tz_reads_times_without_suffix() -> None:
    zone = ZoneInfo("America/Mexico_City")
    (signer,) = parse_allowed_signers(f'a@x valid-after="20240601" {ED}', local_tz=zone)
    assert signer.valid_after == datetime(2024, 6, 1, 6, tzinfo=UTC)
    assert signer.valid_at(datetime(2024, 6, 1, 6, tzinfo=UTC))
    assert not signer.valid_at(datetime(2024, 6, 1, 6, tzinfo=UTC) - timedelta(seconds=1))
