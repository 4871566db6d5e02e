"""Test helpers for ``prep_agent.sshsig``: the real ``ssh-keygen``, and blob surgery.

The blob helpers here are written independently of the module under test, so that
the tests do not trust the code they check.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import subprocess
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.kit import ssh_verify

SSH_KEYGEN = "/usr/bin/ssh-keygen"
NOW = datetime(2024, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
"""The verification time of every check (ssh-keygen gets it as ``verify-time``)."""
VERIFY_TIME = "20240601120000Z"
MESSAGE = b'{"format": "prep-cut/1", "election": "coah-ayun-2021", "sequence": 7}\n'


@dataclass(frozen=True)
class KeyPair:
    """A key made by ssh-keygen: private key file, public line and its principal."""

    name: str
    path: Path
    public_line: str
    principal: str

    def private_bytes(self) -> bytes:
        """Return the OpenSSH private key file."""
        return self.path.read_bytes()

    def public_blob(self) -> bytes:
        """Return the SSH wire encoding of the public key."""
        return base64.b64decode(self.public_line.split()[1])

    def allowed_line(self, options: str = "") -> str:
        """Return an allowed_signers line for this key."""
        return " ".join(part for part in (self.principal, options, self.public_line) if part)


def run_keygen(args: list[str], directory: Path, stdin: bytes = b"", tz: str = "UTC") -> int:
    """Run ssh-keygen with a clean environment; return its exit status."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(directory), "LC_ALL": "C", "TZ": tz}
    done = subprocess.run(
        [SSH_KEYGEN, *args], input=stdin, capture_output=True, env=env, cwd=directory, check=False
    )
    return done.returncode


def generate(directory: Path, name: str, key_type: str, bits: int | None = None) -> KeyPair:
    """Generate an unencrypted key with ssh-keygen."""
    path = directory / name
    args = ["-q", "-t", key_type, "-N", "", "-C", "", "-f", str(path)]
    if bits is not None:
        args += ["-b", str(bits)]
    assert run_keygen(args, directory) == 0
    public = path.with_suffix(".pub").read_text().strip()
    return KeyPair(name, path, public, f"inst-{name}@iec.org.mx")


def ssh_sign(
    key: KeyPair, message: bytes, directory: Path, namespace: str = "prep-cut", hashalg: str = ""
) -> bytes:
    """Sign ``message`` with ``ssh-keygen -Y sign``; return the armored signature."""
    target = directory / f"msg-{key.name}-{namespace}-{hashalg or 'default'}"
    target.write_bytes(message)
    options = ["-O", f"hashalg={hashalg}"] if hashalg else []
    status = run_keygen(
        ["-Y", "sign", "-n", namespace, "-f", str(key.path), *options, str(target)], directory
    )
    assert status == 0
    return target.with_name(target.name + ".sig").read_bytes()


def ssh_verify_status(
    allowed: str,
    principal: str,
    armored: bytes,
    message: bytes,
    directory: Path,
    tz: str = "UTC",
) -> int:
    """The exit status of ``ssh-keygen -Y verify`` at ``VERIFY_TIME`` (the kit's ``ssh_verify``)."""
    (directory / "allowed_signers").write_text(allowed)
    (directory / "block.sig").write_bytes(armored)
    return ssh_verify(
        directory / "allowed_signers",
        directory / "block.sig",
        message,
        principal,
        options=[f"verify-time={VERIFY_TIME}"],
        tz=tz,
        check=False,
    )


def ssh_fingerprint(key: KeyPair, directory: Path) -> str:
    """Return the SHA256 fingerprint ``ssh-keygen -l`` prints."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(directory), "LC_ALL": "C"}
    out = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", f"{key.path}.pub"],
        capture_output=True,
        env=env,
        check=True,
    ).stdout
    return out.split()[1].decode()


# --- SSH wire format, written independently of prep_agent.sshsig ----------------


def ssh_string(value: bytes | str) -> bytes:
    """Encode an SSH string."""
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(raw)) + raw


def ssh_mpint(value: int) -> bytes:
    """Encode a non-negative SSH mpint."""
    return ssh_string(value.to_bytes(value.bit_length() // 8 + 1, "big") if value else b"")


def read_strings(data: bytes) -> list[bytes]:
    """Split concatenated SSH strings."""
    out, position = [], 0
    while position < len(data):
        (size,) = struct.unpack(">I", data[position : position + 4])
        out.append(data[position + 4 : position + 4 + size])
        position += 4 + size
    return out


@dataclass(frozen=True)
class Blob:
    """The fields of a binary SSHSIG blob."""

    version: int
    key: bytes
    namespace: bytes
    reserved: bytes
    hashalg: bytes
    signature: bytes

    @classmethod
    def split(cls, blob: bytes) -> Blob:
        """Split a well-formed blob into its fields."""
        assert blob[:6] == b"SSHSIG"
        (version,) = struct.unpack(">I", blob[6:10])
        key, namespace, reserved, hashalg, signature = read_strings(blob[10:])
        return cls(version, key, namespace, reserved, hashalg, signature)

    def join(self) -> bytes:
        """Encode the fields as a blob."""
        fields = (self.key, self.namespace, self.reserved, self.hashalg, self.signature)
        return b"SSHSIG" + struct.pack(">I", self.version) + b"".join(map(ssh_string, fields))

    def with_(self, **changes: object) -> Blob:
        """Return a copy with some fields changed."""
        return replace(self, **changes)  # type: ignore[arg-type]


def dearmor(armored: bytes) -> bytes:
    """Decode the first armored block."""
    lines = armored.decode().strip().splitlines()
    assert lines[0] == "-----BEGIN SSH SIGNATURE-----"
    end = lines.index("-----END SSH SIGNATURE-----")
    return base64.b64decode("".join(lines[1:end]))


def rearmor(blob: bytes) -> bytes:
    """Armor a blob as ssh-keygen does (base64 wrapped at 70 columns)."""
    text = base64.b64encode(blob).decode()
    body = "".join(text[i : i + 70] + "\n" for i in range(0, len(text), 70))
    return f"-----BEGIN SSH SIGNATURE-----\n{body}-----END SSH SIGNATURE-----\n".encode()


def signed_data(message: bytes, namespace: str = "prep-cut", hashalg: str = "sha512") -> bytes:
    """Return the PROTOCOL.sshsig data that a signer signs."""
    digest = hashlib.new(hashalg, message).digest()
    return b"SSHSIG" + b"".join(map(ssh_string, (namespace, b"", hashalg, digest)))


def load_private(key: KeyPair) -> ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey:
    """Load an ed25519 or ECDSA key made by ssh-keygen with cryptography."""
    loaded = serialization.load_ssh_private_key(key.private_bytes(), password=None)
    assert isinstance(loaded, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey))
    return loaded


def forge(signer: KeyPair, embedded_key: bytes, message: bytes, hashalg: str = "sha512") -> bytes:
    """Build a blob that embeds ``embedded_key`` but is signed by ``signer``."""
    private = load_private(signer)
    data = signed_data(message, hashalg=hashalg)
    sig_type = signer.public_line.split()[0]
    if isinstance(private, ed25519.Ed25519PrivateKey):
        raw = private.sign(data)
    else:
        digest = {256: hashes.SHA256(), 384: hashes.SHA384(), 521: hashes.SHA512()}
        r, s = decode_dss_signature(private.sign(data, ec.ECDSA(digest[private.curve.key_size])))
        raw = ssh_mpint(r) + ssh_mpint(s)
    signature = ssh_string(sig_type) + ssh_string(raw)
    return Blob(1, embedded_key, b"prep-cut", b"", hashalg.encode(), signature).join()


SK_TYPE = "sk-ssh-ed25519@openssh.com"


def sk_ed25519(signer: KeyPair, message: bytes, application: str = "ssh:") -> tuple[str, bytes]:
    """Make a valid ``sk-ssh-ed25519`` key line and signature blob (PROTOCOL.u2f).

    The FIDO authenticator is played by an ordinary Ed25519 key.
    """
    private = load_private(signer)
    assert isinstance(private, ed25519.Ed25519PrivateKey)
    point = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key = ssh_string(SK_TYPE) + ssh_string(point) + ssh_string(application)
    flags, counter = b"\x01", struct.pack(">I", 42)  # user presence
    data = signed_data(message)
    to_sign = (
        hashlib.sha256(application.encode()).digest()
        + flags
        + counter
        + hashlib.sha256(data).digest()
    )
    signature = ssh_string(SK_TYPE) + ssh_string(private.sign(to_sign)) + flags + counter
    blob = Blob(1, key, b"prep-cut", b"", b"sha512", signature).join()
    return f"{SK_TYPE} {base64.b64encode(key).decode()}", blob
