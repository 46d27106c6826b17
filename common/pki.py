"""The federation PKI: one private CA that issues the coordinator's and the clients' certificates.

Every participant holds a bundle of three files: its certificate, its private key and the CA
certificate. Both sides of a connection verify the peer against that CA (mutual TLS), and the
coordinator uses the client certificate's common name as the client's identity. Keys are ECDSA
P-256 and signatures SHA-256: small, fast, and accepted by every TLS stack gRPC ships with.

The CA key (`ca.key`) never leaves the CA directory; `issue_certificate` copies only `ca.pem`
into a participant's bundle. `revoke_certificate` keeps the CA's revocation list (`crl.pem`, a
signed X.509 CRL) that the coordinator checks on every call.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import logging
import os
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlink.common.errors import PKIError

logger = logging.getLogger(__name__)

Role = Literal["server", "client", "admin"]

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
CRL_FILE = "crl.pem"
DEFAULT_CA_NAME = "fedlink federation CA"
DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 825

# Certificates start five minutes in the past so a peer whose clock runs a little behind does not
# reject a certificate issued a moment ago.
CLOCK_SKEW = dt.timedelta(minutes=5)

# 64 is the X.509 upper bound for a common name; the character set keeps names usable as file
# names and as log/metric labels. Starting with a letter or digit rules out ".", ".." and names
# that look like command-line options.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

# The admin role, as an extended key usage of fedlink's own: an OID under 2.25 (ITU-T X.667,
# a UUID as an OID, unique without registering an arc). An admin certificate also carries
# client-auth (it is a TLS client), so the role is the presence of this usage. It is not a
# subject field (OU=admin): anything in the subject is what `--name` writes, and a name must
# never grant a role.
ADMIN_USAGE = x509.ObjectIdentifier("2.25.332630027600117030268192354391605971944")

# The extended key usages each role's certificate carries; the TLS side it plays comes first.
_ROLE_USAGES = {
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "admin": [ExtendedKeyUsageOID.CLIENT_AUTH, ADMIN_USAGE],
}
_ROLE_FLAGS = {"server": "--server", "client": "--client", "admin": "--admin"}

_ISSUE_HINT = (
    "`fedlink certs issue --ca-dir CA_DIR --out DIR --name NAME --server|--client|--admin`"
)

# What fedlink accepts from any certificate, whoever made it: SHA-1 (and older) signatures can be
# forged and RSA keys under 2048 bits factored, so neither may vouch for an identity.
_SIGNATURE_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
MIN_RSA_BITS = 2048

# RFC 5280 limits serial numbers to 20 octets; the cryptography library to 159 bits.
MAX_SERIAL = 2**159 - 1


@dataclass(frozen=True)
class CertPaths:
    """Where a certificate, its private key and the CA certificate were written."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class Credentials:
    """A participant's PEM-encoded certificate, private key and CA certificate, checked to match.

    These are exactly the three byte strings `grpc.ssl_server_credentials` and
    `grpc.ssl_channel_credentials` take. The key is left out of `repr` so it never reaches a log.
    """

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes


def init_ca(
    directory: Path,
    name: str = DEFAULT_CA_NAME,
    days: int = DEFAULT_CA_DAYS,
    *,
    force: bool = False,
) -> CertPaths:
    """Create the federation CA: a self-signed certificate (`ca.pem`) and its key (`ca.key`).

    Replacing a CA invalidates every certificate it issued, so an existing CA is kept unless
    `force` is set. The CA may only sign end-entity certificates (path length 0).
    """
    if days < 1:
        raise PKIError(f"CA validity must be at least 1 day, got {days}; pass a positive --days")
    if not name.strip():
        raise PKIError("the CA name is empty; pass a descriptive --name")
    directory = Path(directory)
    cert_path = directory / CA_CERT_FILE
    key_path = directory / CA_KEY_FILE
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise PKIError(
            f"a federation CA already exists in {directory} ({existing[0].name}); replacing it "
            "would invalidate every certificate it issued. Use another --dir, or pass --force "
            "to replace it and then reissue all participant certificates"
        )

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )

    _make_private_dir(directory)
    # Key first: a crash in between leaves a key without a certificate, which init refuses to
    # overwrite silently, rather than a certificate nobody can sign with.
    _write_file(key_path, _private_key_pem(key), private=True)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return CertPaths(cert=cert_path, key=key_path, ca=cert_path)


def issue_certificate(
    ca_dir: Path,
    out_dir: Path,
    name: str,
    *,
    role: Role,
    hosts: Sequence[str] = (),
    days: int = DEFAULT_CERT_DAYS,
    force: bool = False,
) -> CertPaths:
    """Issue a server, client or admin certificate signed by the CA in `ca_dir` and write its
    bundle.

    Writes `<name>.pem`, `<name>.key` and a copy of `ca.pem` into `out_dir`: everything the
    participant needs, and nothing more (never the CA key). `name` becomes the subject common
    name, which the coordinator uses as the client's identity. A server certificate lists the
    host names and IP addresses clients connect to; client and admin certificates list none.
    An admin certificate may call the coordinator's Admin service and nothing else.
    `days=0` yields an already-expired certificate, which is only useful in tests.
    """
    _validate_issued_name(name)
    if role not in _ROLE_USAGES:
        raise PKIError(f"unknown certificate role {role!r}; use 'server', 'client' or 'admin'")
    if days < 0:
        raise PKIError(f"certificate validity cannot be negative, got {days}; pass --days N >= 1")
    if role == "server" and not hosts:
        raise PKIError(
            f"server certificate {name!r} needs at least one host name or IP address that clients "
            "connect to; pass --host (e.g. --host localhost --host 10.0.0.5)"
        )
    if role != "server" and hosts:
        raise PKIError(
            f"{role} certificate {name!r} cannot carry hosts ({', '.join(hosts)}); the coordinator "
            "identifies clients by name. Drop --host, or use --server for the coordinator"
        )
    san = _subject_alt_names(hosts) if role == "server" else None

    ca_dir = Path(ca_dir)
    out_dir = Path(out_dir)
    ca_cert_path, ca_key_path = _ca_files(
        ca_dir, f"create one with `fedlink certs init --dir {ca_dir}` or pass the right --ca-dir"
    )
    ca_pem = _read(ca_cert_path)
    ca_cert = _parse_certificate(ca_pem, ca_cert_path)
    ca_key = _parse_private_key(_read(ca_key_path), ca_key_path)
    if not _same_public_key(ca_key.public_key(), ca_cert.public_key()):
        raise PKIError(
            f"{ca_key_path} does not belong to {ca_cert_path}; restore the matching pair or "
            "create a new CA with `fedlink certs init --force`"
        )
    check_algorithms(ca_cert, f"the federation CA {ca_cert_path}")

    now = dt.datetime.now(dt.timezone.utc)
    ca_expiry = ca_cert.not_valid_after_utc
    if ca_expiry <= now:
        raise PKIError(
            f"the federation CA {ca_cert_path} expired on {ca_expiry:%Y-%m-%d}; create a new one "
            "with `fedlink certs init --force` and reissue every participant certificate"
        )
    not_after = now + dt.timedelta(days=days)
    if not_after > ca_expiry:
        # A certificate cannot outlive its CA in any verifier; say so instead of pretending.
        logger.warning(
            "certificate %s would outlive the CA; its validity ends with the CA on %s",
            name,
            f"{ca_expiry:%Y-%m-%d}",
        )
        not_after = ca_expiry

    cert_path = out_dir / f"{name}.pem"
    key_path = out_dir / f"{name}.key"
    bundle_ca_path = out_dir / CA_CERT_FILE
    if not force:
        existing = [p for p in (cert_path, key_path) if p.exists()]
        if existing:
            raise PKIError(
                f"{existing[0]} already exists; choose another --name, or pass --force to "
                "replace it (the old certificate stays valid until it expires)"
            )
        if (
            bundle_ca_path.exists()
            and not _is_same_file(bundle_ca_path, ca_cert_path)
            and _read(bundle_ca_path) != ca_pem
        ):
            raise PKIError(
                f"{bundle_ca_path} holds a different CA certificate; keep bundles from different "
                "federations in different --out directories, or pass --force to replace it"
            )
    if out_dir.resolve() == ca_dir.resolve():
        logger.warning(
            "writing %s into the CA directory; hand the participant only %s, %s and %s, never %s",
            name,
            cert_path.name,
            key_path.name,
            CA_CERT_FILE,
            CA_KEY_FILE,
        )

    key = ec.generate_private_key(ec.SECP256R1())
    eku = x509.ExtendedKeyUsage(_ROLE_USAGES[role])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # keyAgreement alongside digitalSignature: ECDSA signs the handshake, and some stacks
        # also want it for static ECDH.
        .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
        .add_extension(eku, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())

    _make_private_dir(out_dir)
    _write_file(key_path, _private_key_pem(key), private=True)
    _write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    if not _is_same_file(bundle_ca_path, ca_cert_path):
        _write_file(bundle_ca_path, ca_pem, private=False)
    return CertPaths(cert=cert_path, key=key_path, ca=bundle_ca_path)


def load_credentials(cert: Path, key: Path, ca: Path, *, role: Role | None = None) -> Credentials:
    """Read a participant's bundle and check it before any TLS handshake can fail obscurely.

    Checks that the files exist, the key belongs to the certificate, the certificate was signed
    by the CA, and both certificates are valid now. With `role`, also checks the certificate's
    extended key usage, so a client certificate handed to the coordinator fails here, clearly.
    """
    cert, key, ca = Path(cert), Path(key), Path(ca)
    for path, what in ((cert, "certificate"), (key, "private key"), (ca, "CA certificate")):
        if not path.is_file():
            raise PKIError(f"{what} file {path} not found; issue a bundle with {_ISSUE_HINT}")
    _warn_if_readable_by_others(key)

    cert_pem, key_pem, ca_pem = _read(cert), _read(key), _read(ca)
    certificate = _parse_certificate(cert_pem, cert)
    private_key = _parse_private_key(key_pem, key)
    ca_certificate = _parse_certificate(ca_pem, ca)

    if not _same_public_key(private_key.public_key(), certificate.public_key()):
        raise PKIError(
            f"private key {key} does not match certificate {cert}; pass the .key file issued "
            "together with it, or issue a new pair with `fedlink certs issue`"
        )
    if not _is_ca(ca_certificate):
        raise PKIError(f"{ca} is not a CA certificate; pass the ca.pem from your bundle")
    if _is_ca(certificate):
        raise PKIError(
            f"{cert} is a CA certificate; pass the participant certificate issued by "
            "`fedlink certs issue`, not ca.pem"
        )
    check_algorithms(ca_certificate, f"CA certificate {ca}")
    check_algorithms(certificate, f"certificate {cert}")
    if not _issued_by(certificate, ca_certificate):
        raise PKIError(
            f"certificate {cert} was not issued by the CA in {ca}; both must come from the same "
            "federation CA (`fedlink certs issue` puts the matching ca.pem in the bundle)"
        )

    now = dt.datetime.now(dt.timezone.utc)
    _check_validity(ca_certificate, ca, now, renew="create a new CA with `fedlink certs init`")
    _check_validity(certificate, cert, now, renew="issue a new one with `fedlink certs issue`")
    if role is not None:
        _check_role(certificate, f"certificate {cert}", role)
    return Credentials(cert_pem=cert_pem, key_pem=key_pem, ca_pem=ca_pem)


@dataclass(frozen=True)
class PeerCertificate:
    """What the coordinator needs from a checked client certificate: who it names, which serial
    number the CA gave it (for revocation), and when it is valid."""

    identity: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime


def peer_certificate(
    cert_pem: bytes, ca_pem: bytes, role: Literal["client", "admin"] = "client"
) -> PeerCertificate:
    """Check a peer's client (or, with `role="admin"`, admin) certificate against the federation
    CA (`ca_pem`); its subject common name is the peer's fedlink identity. PKIError says which
    check failed. Each role refuses the other's certificates (see `_check_role`).

    Only certificates the CA signed directly are accepted: TLS stacks build chains through any
    intermediate the peer sends, and a leaf from an intermediate (or from a client certificate
    with CA:TRUE) could claim any name and would escape revocation of its issuer. The leaf must
    not be a CA, must be for client authentication, use accepted algorithms and carry a name
    `fedlink certs issue` could have written (no control characters, at most 64 characters),
    so an identity is always safe in logs, metric labels and file names. The validity period
    is the caller's to check: it depends on the time, the rest does not.
    """
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise PKIError("peer certificate is not a valid PEM certificate") from exc
    ca_certificate = x509.load_pem_x509_certificate(ca_pem)
    serial = f"serial {certificate.serial_number:x}"
    # First: a SHA-1 signature proves nothing, and the library cannot even check one.
    check_algorithms(certificate, f"the client certificate ({serial})")
    if not _issued_by(certificate, ca_certificate):
        raise PKIError(
            f"the client certificate ({serial}) was not issued by the federation CA itself; "
            "fedlink accepts only certificates the CA signed directly (no intermediates), "
            "issued with `fedlink certs issue --client`"
        )
    if _is_ca(certificate):
        raise PKIError(
            f"the client certificate ({serial}) is a CA certificate (CA:TRUE); issue a client "
            "certificate with `fedlink certs issue --client`"
        )
    _check_role(certificate, f"the certificate ({serial})", role)
    attributes = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attributes:
        raise PKIError(
            f"the client certificate ({serial}) has no common name, so it carries no fedlink "
            "identity; issue it with `fedlink certs issue --name NAME`"
        )
    value = attributes[0].value
    name = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if not _NAME_PATTERN.fullmatch(name):
        # ascii() escapes control characters and the cut bounds the length, so the refused
        # name cannot forge or flood a log line wherever this message ends up.
        shown = ascii(name[:64]) + ("..." if len(name) > 64 else "")
        raise PKIError(
            f"the client certificate ({serial}) names {shown}, which is not a fedlink name "
            "(1-64 letters, digits, '.', '_' or '-'); issue one with `fedlink certs issue`"
        )
    return PeerCertificate(
        identity=name,
        serial=certificate.serial_number,
        not_before=certificate.not_valid_before_utc,
        not_after=certificate.not_valid_after_utc,
    )


def check_algorithms(certificate: x509.Certificate, what: str) -> None:
    """PKIError unless `certificate` is signed with SHA-2 and holds a strong enough key."""
    algorithm = certificate.signature_hash_algorithm
    if not isinstance(algorithm, _SIGNATURE_HASHES):
        used = algorithm.name.upper() if algorithm is not None else "no hash"
        raise PKIError(
            f"{what} is signed with {used}, which can be forged; fedlink accepts SHA-256, "
            "SHA-384 or SHA-512 signatures. Issue a new one with `fedlink certs issue`"
        )
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise PKIError(
                f"{what} holds a {key.key_size}-bit RSA key; fedlink accepts RSA keys of at "
                f"least {MIN_RSA_BITS} bits. Issue a new one with `fedlink certs issue`"
            )
    elif not (isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, _EC_CURVES)):
        raise PKIError(
            f"{what} holds a key fedlink does not accept; use ECDSA P-256/384/521 or RSA of at "
            f"least {MIN_RSA_BITS} bits (`fedlink certs issue` makes ECDSA P-256)"
        )


def sign_statement(key_pem: bytes, statement: bytes) -> bytes:
    """An ECDSA (SHA-256) signature of `statement` with a participant's private key."""
    key = _parse_private_key(key_pem, Path("<private key>"))
    return key.sign(statement, ec.ECDSA(hashes.SHA256()))


def verify_statement(
    cert_pem: bytes, ca_pem: bytes, identity: str, statement: bytes, signature: bytes
) -> None:
    """Check that the federation's client `identity` signed `statement`: `cert_pem` was issued
    by the CA in `ca_pem`, is valid now, is a client certificate, names `identity`, and its key
    made `signature`. PKIError says which check failed."""
    what = f"the certificate presented for {identity!r}"
    certificate, public_key = _statement_signer(cert_pem, ca_pem, identity)
    _check_validity(certificate, Path(what), dt.datetime.now(dt.timezone.utc), renew="renew it")
    try:
        public_key.verify(signature, statement, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PKIError(f"the signature is not {identity!r}'s") from None


# Every secure-aggregation round checks the same certificates again (each client checks every
# peer's, the coordinator every client's): the checks that do not depend on the time are cached,
# keyed by the exact bytes checked, so a different certificate or CA is always checked afresh.
# Only successes are kept (lru_cache does not store exceptions).
@functools.lru_cache(maxsize=4096)
def _statement_signer(
    cert_pem: bytes, ca_pem: bytes, identity: str
) -> tuple[x509.Certificate, ec.EllipticCurvePublicKey]:
    """`cert_pem`, checked to be a client certificate of the CA in `ca_pem` that names
    `identity`, and its public key; the validity period is the caller's to check."""
    what = f"the certificate presented for {identity!r}"
    try:
        named = peer_certificate(cert_pem, ca_pem).identity
    except PKIError as exc:
        raise PKIError(f"{what}: {exc}") from None
    if named != identity:
        raise PKIError(f"{what} names {named!r}")
    certificate = _parse_certificate(cert_pem, Path(what))
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PKIError(f"{what} does not hold an elliptic-curve key")
    return certificate, public_key


@dataclass(frozen=True)
class RevocationList:
    """A verified certificate revocation list: revoked serial numbers and when each was revoked."""

    revoked: dict[int, dt.datetime]
    last_update: dt.datetime
    next_update: dt.datetime | None
    number: int


@dataclass(frozen=True)
class Revocation:
    """What `revoke_certificate` did."""

    crl: Path
    serial: int
    already_revoked: bool
    total: int


def validate_name(name: str) -> None:
    """Refuse names that cannot be a fedlink certificate name (and so never an identity)."""
    if not _NAME_PATTERN.fullmatch(name):
        raise PKIError(
            f"invalid certificate name {name!r}: use 1-64 characters of letters, digits, '.', "
            "'_' or '-', starting with a letter or digit (e.g. client-1)"
        )


def revoke_certificate(
    ca_dir: Path,
    *,
    cert: Path | None = None,
    serial: int | None = None,
    reason: x509.ReasonFlags | None = None,
) -> Revocation:
    """Add a certificate (by file or serial number) to the CA's revocation list, `crl.pem`.

    The list is an X.509 CRL signed by the federation CA, re-signed with a higher CRL number on
    every change. It is public: copy it to the coordinator, which reloads it when the file
    changes. Revoking an already revoked certificate changes nothing.
    """
    if (cert is None) == (serial is None):
        raise PKIError("name the certificate to revoke: pass either --cert FILE or --serial N")
    ca_dir = Path(ca_dir)
    ca_cert_path, ca_key_path = _ca_files(
        ca_dir, "revoke with the --ca-dir that issued the certificate"
    )
    ca_pem = _read(ca_cert_path)
    ca_cert = _parse_certificate(ca_pem, ca_cert_path)
    ca_key = _parse_private_key(_read(ca_key_path), ca_key_path)
    if not _same_public_key(ca_key.public_key(), ca_cert.public_key()):
        raise PKIError(
            f"{ca_key_path} does not belong to {ca_cert_path}; restore the matching pair"
        )
    if cert is not None:
        certificate = _parse_certificate(_read(Path(cert)), Path(cert))
        if not _issued_by(certificate, ca_cert):
            raise PKIError(
                f"certificate {cert} was not issued by the CA in {ca_dir}; revoke it with the "
                "CA that issued it"
            )
        serial = certificate.serial_number
    assert serial is not None
    if not 0 < serial <= MAX_SERIAL:
        raise PKIError(
            f"no certificate has serial number {serial:x}: serial numbers are positive and at "
            "most 40 hex digits; copy it from `openssl x509 -noout -serial -in CERT`"
        )

    crl_path = ca_dir / CRL_FILE
    entries: list[x509.RevokedCertificate] = []
    number = 0
    if crl_path.exists():
        existing = load_revocation_list(crl_path, ca_pem)
        if serial in existing.revoked:
            return Revocation(crl_path, serial, already_revoked=True, total=len(existing.revoked))
        crl = x509.load_pem_x509_crl(_read(crl_path))
        entries = list(crl)
        number = existing.number

    now = dt.datetime.now(dt.timezone.utc)
    entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now)
    if reason is not None:
        entry = entry.add_extension(x509.CRLReason(reason), critical=False)
    entries.append(entry.build())
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        # fedlink publishes no CRL schedule; the list stays authoritative while the CA is valid.
        .next_update(ca_cert.not_valid_after_utc)
        .add_extension(x509.CRLNumber(number + 1), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )
    for revoked in entries:
        builder = builder.add_revoked_certificate(revoked)
    signed = builder.sign(ca_key, hashes.SHA256())
    _write_file(crl_path, signed.public_bytes(serialization.Encoding.PEM), private=False)
    return Revocation(crl_path, serial, already_revoked=False, total=len(entries))


def load_revocation_list(path: Path, ca_pem: bytes) -> RevocationList:
    """Read a CRL and check that the federation CA (`ca_pem`) issued and signed it."""
    path = Path(path)
    if not path.is_file():
        raise PKIError(
            f"revocation list {path} not found; copy crl.pem from the CA directory "
            "(`fedlink certs revoke` writes it there)"
        )
    data = _read(path)
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as exc:
        raise PKIError(
            f"{path} is not a PEM certificate revocation list; pass the crl.pem written by "
            "`fedlink certs revoke`"
        ) from exc
    ca_cert = x509.load_pem_x509_certificate(ca_pem)
    public_key = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PKIError(
            f"revocation list {path} was not issued by this federation's CA; pass the crl.pem "
            "from the CA directory that issued the client certificates"
        )
    if not crl.is_signature_valid(public_key):
        raise PKIError(
            f"revocation list {path} has an invalid signature (tampered, or from another CA); "
            "copy crl.pem again from the CA directory"
        )
    try:
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        number = 0
    return RevocationList(
        revoked={entry.serial_number: entry.revocation_date_utc for entry in crl},
        last_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        number=number,
    )


def _validate_issued_name(name: str) -> None:
    validate_name(name)
    # The bundle already holds ca.pem; a participant called "ca" would overwrite it.
    if name.lower() == Path(CA_CERT_FILE).stem:
        raise PKIError(f"the name {name!r} is reserved for the CA certificate; choose another")


def _subject_alt_names(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for raw in dict.fromkeys(h.strip() for h in hosts):
        if not raw or any(c.isspace() for c in raw) or not raw.isascii():
            raise PKIError(
                f"invalid --host {raw!r}: pass an ASCII DNS name (e.g. fl.example.org) or an "
                "IP address"
            )
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(raw)))
        except ValueError:
            entries.append(x509.DNSName(raw))
    return x509.SubjectAlternativeName(entries)


def _key_usage(
    *,
    digital_signature: bool = False,
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        ski = None
    if ski is not None:
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    # A CA made elsewhere may lack a key identifier; derive it from the key as RFC 5280 suggests.
    public_key = ca_cert.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise PKIError("the CA key is not an EC key; create a fedlink CA with `fedlink certs init`")
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)


def _issued_by(certificate: x509.Certificate, ca_certificate: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(ca_certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_validity(
    certificate: x509.Certificate, path: Path, now: dt.datetime, *, renew: str
) -> None:
    what = "CA certificate" if _is_ca(certificate) else "certificate"
    not_after = certificate.not_valid_after_utc
    not_before = certificate.not_valid_before_utc
    if now > not_after:
        raise PKIError(f"{what} {path} expired on {not_after:%Y-%m-%d}; {renew}")
    if now < not_before:
        raise PKIError(
            f"{what} {path} is not valid until {not_before:%Y-%m-%d %H:%M} UTC; check this "
            "machine's clock, or wait"
        )


def _check_role(certificate: x509.Certificate, what: str, role: Role) -> None:
    """PKIError unless `certificate` carries `role`'s usages and no other role's: a certificate
    that could be read as two roles (an admin usage beside server-auth, say) is refused, so no
    certificate ever holds more power than the one role it was issued for."""
    try:
        usages = list(certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        # X.509 reads a missing EKU as "any usage"; fedlink wants the role stated, as the
        # coordinator does on every call.
        usages = []
    wanted = _ROLE_USAGES[role][0]
    if wanted not in usages:
        side = "server" if role == "server" else "client"
        raise PKIError(
            f"{what} is not a {role} certificate (no {side}-auth extended key usage); issue one "
            f"with `fedlink certs issue {_ROLE_FLAGS[role]}`"
        )
    is_admin = ADMIN_USAGE in usages
    if role == "client" and is_admin:
        raise PKIError(
            f"{what} is an admin certificate: it may call the Admin service (`fedlink status`), "
            "never take part in the federation; give each site a certificate from "
            "`fedlink certs issue --client`"
        )
    if role == "admin" and not is_admin:
        raise PKIError(
            f"{what} is not an admin certificate (no fedlink admin usage); only certificates "
            "from `fedlink certs issue --admin` may call the Admin service"
        )
    if is_admin and (role == "server" or ExtendedKeyUsageOID.SERVER_AUTH in usages):
        raise PKIError(
            f"{what} carries both the admin and the server-auth usage, so its role is "
            "ambiguous; fedlink refuses it. Issue separate certificates with "
            "`fedlink certs issue --server` and `--admin`"
        )


def _same_public_key(a: object, b: object) -> bool:
    if not isinstance(a, ec.EllipticCurvePublicKey) or not isinstance(b, ec.EllipticCurvePublicKey):
        return False
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return a.public_bytes(*fmt) == b.public_bytes(*fmt)


def _parse_certificate(data: bytes, path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PKIError(
            f"{path} is not a PEM certificate; pass the .pem written by `fedlink certs`"
        ) from exc


def _parse_private_key(data: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    # The library's own messages are deliberately not passed on: nothing derived from key
    # material should reach a terminal or a log.
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise PKIError(
            f"private key {path} is password-protected; gRPC needs an unencrypted key file "
            "(protect it with file permissions instead)"
        ) from exc
    except ValueError as exc:
        raise PKIError(
            f"{path} is not a PEM private key; pass the .key written by `fedlink certs`"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"private key {path} is not an EC key; issue one with `fedlink certs`")
    return key


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted because gRPC cannot read encrypted keys; the 0600 file mode protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _warn_if_readable_by_others(path: Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "private key %s is readable by group or others (mode %s); restrict it with "
            "`chmod 600 %s`",
            path,
            oct(mode),
            path,
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise PKIError(f"cannot read {path}: {exc.strerror}; check its permissions") from exc


def _is_same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _make_private_dir(directory: Path) -> None:
    try:
        # Only a directory created here gets 0700; an existing one is the user's to manage.
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PKIError(f"cannot create directory {directory}: {exc.strerror}") from exc


def _write_file(path: Path, data: bytes, *, private: bool) -> None:
    """Write `path` atomically; a private file is created 0600 and never exists with wider modes.

    The data goes to a fresh file in the same directory, opened with O_EXCL and mode 0600 from
    the start (no window in which another user could open it), then renamed over the target, so
    readers never see half a file and replacing a wider-mode file does not inherit its mode.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(tmp, flags, 0o600 if private else 0o644)
    except OSError as exc:
        raise PKIError(
            f"cannot write {path}: {exc.strerror}; check that {path.parent} is writable"
        ) from exc
    done = False
    try:
        with os.fdopen(fd, "wb") as handle:
            if private and hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o600)  # exact mode, whatever the umask
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        done = True
    except OSError as exc:
        raise PKIError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


def _ca_files(ca_dir: Path, hint: str) -> tuple[Path, Path]:
    """The CA certificate and key in `ca_dir`; PKIError naming the missing one and `hint`."""
    paths = (ca_dir / CA_CERT_FILE, ca_dir / CA_KEY_FILE)
    for path in paths:
        if not path.is_file():
            raise PKIError(f"no federation CA in {ca_dir} ({path.name} is missing); {hint}")
    return paths
