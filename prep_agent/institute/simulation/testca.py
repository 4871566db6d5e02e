"""A throwaway certificate authority for the simulated institute's HTTPS server.

Made with the ``cryptography`` library: an ECDSA P-256 CA and leaves it signs
for given host names and addresses (``localhost`` and ``127.0.0.1`` by
default). For tests and drills on loopback only: the keys are written
unencrypted and the CA is valid for a few days.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 7
"""Days the CA and its leaves are valid (from an hour ago, to bear small clock skews)."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1")
"""The names of a leaf for the loopback server."""


@dataclass(frozen=True)
class TestCA:
    """A CA's certificate and private key, able to issue leaves."""

    __test__ = False  # not a pytest test class despite its name

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        """The CA certificate in PEM (the ``ca_file`` a difusor trusts)."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class Leaf:
    """A server certificate and its key, in PEM."""

    certificate_pem: bytes
    key_pem: bytes
    spki_sha256: bytes
    """SHA-256 of the leaf's SubjectPublicKeyInfo (DER): the value a pin names."""


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.now(timezone.utc)
    return builder.not_valid_before(now - timedelta(hours=1)).not_valid_after(
        now + timedelta(days=VALID_DAYS)
    )


def make_ca(common_name: str = "PREP simulación CA de prueba") -> TestCA:
    """Create a new self-signed CA (ECDSA P-256)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return TestCA(_validity(builder).sign(key, hashes.SHA256()), key)


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(ca: TestCA, names: tuple[str, ...] = LOOPBACK_NAMES) -> Leaf:
    """Issue a server certificate for ``names`` (host names or IP addresses)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    certificate = _validity(builder).sign(ca.key, hashes.SHA256())
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return Leaf(
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        digest.finalize(),
    )


def write_server_files(folder: Path, ca: TestCA, leaf: Leaf) -> tuple[Path, Path, Path]:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` (mode 0600) into ``folder``.

    Return their paths (CA, certificate, key). Raises OSError.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.pem)
    cert_path.write_bytes(leaf.certificate_pem)
    key_path.touch(mode=0o600)
    key_path.write_bytes(leaf.key_pem)
    return ca_path, cert_path, key_path
