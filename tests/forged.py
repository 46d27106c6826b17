"""Certificates `fedlink certs` would never issue, signed with a real CA key: what a careless
operator or a holder of a CA:TRUE certificate could make. Used by the identity-edge tests."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True)
class Signer:
    """A certificate and the key that signs with it (the federation CA, or a forged issuer)."""

    cert: x509.Certificate
    key: PrivateKey

    @classmethod
    def load(cls, ca_dir: Path) -> Signer:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key)


@dataclass(frozen=True)
class Forged:
    cert: x509.Certificate
    key: PrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def as_signer(self) -> Signer:
        return Signer(self.cert, self.key)

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{name}.pem", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


def forge(
    issuer: Signer,
    name: str,
    *,
    ca: bool = False,
    eku: bool = True,
    key: PrivateKey | None = None,
    not_after: dt.datetime | None = None,
) -> Forged:
    """A client certificate for `name` signed by `issuer`, with the flaw asked for."""
    now = dt.datetime.now(dt.timezone.utc)
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        # Unvalidated: X.509's 64-character limit is one of the things being forged.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name, _validate=False)]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(
            min(not_after or now + dt.timedelta(days=1), issuer.cert.not_valid_after_utc)
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if eku:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    return Forged(builder.sign(issuer.key, hashes.SHA256()), key)


# ecdsa-with-SHA1 (1.2.840.10045.4.1) as a DER AlgorithmIdentifier.
_ECDSA_SHA1 = bytes.fromhex("300906072a8648ce3d0401")


def forge_sha1(issuer: Signer, name: str) -> Forged:
    """A client certificate signed with ECDSA-SHA1, which the cryptography library no longer
    produces: the TBS part of a SHA-256 certificate with its algorithm swapped, signed again."""
    assert isinstance(issuer.key, ec.EllipticCurvePrivateKey)
    template = forge(issuer, name)
    tbs = _children(_value(template.cert.tbs_certificate_bytes))
    tbs[2] = _ECDSA_SHA1  # version, serial, signature algorithm, ...
    tbs_der = _tlv(0x30, b"".join(tbs))
    signature = issuer.key.sign(tbs_der, ec.ECDSA(hashes.SHA1()))
    der = _tlv(0x30, tbs_der + _ECDSA_SHA1 + _tlv(0x03, b"\0" + signature))
    return Forged(x509.load_der_x509_certificate(der), template.key)


def _tlv(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        return bytes([tag, n]) + value
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + value


def _header(der: bytes, at: int) -> tuple[int, int]:
    """(start of the value, end of the element) of the DER element at `at`."""
    first = der[at + 1]
    if first < 0x80:
        return at + 2, at + 2 + first
    count = first & 0x7F
    length = int.from_bytes(der[at + 2 : at + 2 + count], "big")
    return at + 2 + count, at + 2 + count + length


def _value(der: bytes) -> bytes:
    start, end = _header(der, 0)
    return der[start:end]


def _children(content: bytes) -> list[bytes]:
    elements, at = [], 0
    while at < len(content):
        _, end = _header(content, at)
        elements.append(content[at:end])
        at = end
    return elements


def self_signed_ca(name: str, not_after: dt.datetime) -> Forged:
    """A federation CA like `fedlink certs init` makes, but ending at `not_after`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Forged(cert, key)
