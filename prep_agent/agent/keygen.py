"""The difusor's report key: an ed25519 pair in OpenSSH format (health-v1 §3).

The private key signs the pushed health reports; the institute adds the printed
``allowed_signers`` line (principal = serviceId, namespace ``prep-health``) to
its collector's trust file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from prep_agent.core import sshkeys
from prep_agent.core.errors import ConfigError
from prep_agent.core.protocol import NAMESPACE_HEALTH


def allowed_signers_line(service_id: str, key: sshkeys.PrivateKey) -> str:
    """The line the institute adds to its collector's allowed_signers."""
    public = sshkeys.public_key_of(key).openssh()
    return f'{service_id} namespaces="{NAMESPACE_HEALTH}" {public}'


def create_key(path: Path, service_id: str, force: bool = False) -> str:
    """Write a new ed25519 key to ``path`` (0600) and ``path.pub``; return the
    allowed_signers line. Raises ``ConfigError`` if ``path`` exists (without
    ``force``) or the serviceId cannot be a principal."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", service_id):
        raise ConfigError(f"serviceId {service_id!r} must be letters, digits, '.', '_' or '-'")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = f"{sshkeys.public_key_of(key).openssh()} {service_id}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_TRUNC if force else os.O_EXCL)
    try:
        if force and path.exists():
            os.chmod(path, 0o600)
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} exists (use --force to replace it)") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
        os.fchmod(fh.fileno(), 0o600)
        fh.flush()
        os.fsync(fh.fileno())
    Path(f"{path}.pub").write_text(public, encoding="utf-8")
    return allowed_signers_line(service_id, key)
