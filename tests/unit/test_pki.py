"""Tests for the federation PKI: CA creation, certificate issuance, and bundle checks."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from forged import Signer, forge, forge_sha1

from fedlink.certs import add_certs_parser
from fedlink.common import pki as pki_module
from fedlink.common.errors import PKIError
from fedlink.common.pki import (
    ADMIN_USAGE,
    CertPaths,
    Credentials,
    init_ca,
    issue_certificate,
    load_credentials,
    load_revocation_list,
    peer_certificate,
    revoke_certificate,
    sign_statement,
    verify_statement,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX-only")


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "ca"
    init_ca(directory)
    return directory


@pytest.fixture
def server(ca_dir: Path, tmp_path: Path) -> CertPaths:
    return issue_certificate(
        ca_dir, tmp_path / "server", "coordinator", role="server", hosts=["localhost", "10.0.0.5"]
    )


@pytest.fixture
def client(ca_dir: Path, tmp_path: Path) -> CertPaths:
    return issue_certificate(ca_dir, tmp_path / "client-1", "client-1", role="client")


def _sign_with_ca(
    ca_dir: Path,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    out_dir: Path,
    name: str = "old-client",
) -> CertPaths:
    """Issue a client bundle with an arbitrary validity window, which the public API refuses."""
    ca_cert = _cert(ca_dir / "ca.pem")
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(
        cert=out_dir / f"{name}.pem", key=out_dir / f"{name}.key", ca=out_dir / "ca.pem"
    )
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    paths.key.chmod(0o600)
    paths.ca.write_bytes((ca_dir / "ca.pem").read_bytes())
    return paths


# --- init_ca -------------------------------------------------------------------------------------


def test_init_ca_writes_a_self_signed_ca_that_can_only_sign_leaf_certificates(
    tmp_path: Path,
) -> None:
    paths = init_ca(tmp_path / "ca", name="test federation")

    assert paths.cert == tmp_path / "ca" / "ca.pem"
    assert paths.key == tmp_path / "ca" / "ca.key"
    cert = _cert(paths.cert)
    assert cert.subject == cert.issuer
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "test federation"
    cert.verify_directly_issued_by(cert)
    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert not usage.digital_signature
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)


@posix_only
def test_init_ca_key_is_owner_only_and_new_directory_is_private(tmp_path: Path) -> None:
    paths = init_ca(tmp_path / "ca")

    assert _mode(paths.key) == 0o600
    assert _mode(tmp_path / "ca") & 0o077 == 0
    assert not list((tmp_path / "ca").glob("*.tmp"))


def test_init_ca_refuses_to_replace_an_existing_ca(ca_dir: Path) -> None:
    before = (ca_dir / "ca.key").read_bytes()

    with pytest.raises(PKIError, match=r"already exists.*--force"):
        init_ca(ca_dir)

    assert (ca_dir / "ca.key").read_bytes() == before


def test_init_ca_with_force_replaces_the_ca(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes()

    init_ca(ca_dir, force=True)

    assert (ca_dir / "ca.pem").read_bytes() != before


# --- issue_certificate ---------------------------------------------------------------------------


def test_server_certificate_lists_dns_names_and_ip_addresses(server: CertPaths) -> None:
    san = _cert(server.cert).extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]


def test_server_certificate_is_for_server_auth_only(server: CertPaths) -> None:
    eku = _cert(server.cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def test_client_certificate_is_for_client_auth_and_has_no_hosts(client: CertPaths) -> None:
    cert = _cert(client.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_issued_certificate_is_a_ca_signed_leaf_named_after_the_participant(
    ca_dir: Path, client: CertPaths
) -> None:
    cert = _cert(client.cert)
    ca_cert = _cert(ca_dir / "ca.pem")

    cert.verify_directly_issued_by(ca_cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "client-1"
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and usage.value.key_agreement
    assert not usage.value.key_cert_sign
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_issued_certificate_tolerates_clock_skew(client: CertPaths) -> None:
    cert = _cert(client.cert)
    now = dt.datetime.now(dt.timezone.utc)

    assert now - cert.not_valid_before_utc >= dt.timedelta(minutes=4)
    assert cert.not_valid_after_utc - now > dt.timedelta(days=824)


def test_each_certificate_gets_its_own_random_serial(ca_dir: Path, tmp_path: Path) -> None:
    a = issue_certificate(ca_dir, tmp_path / "out", "client-a", role="client")
    b = issue_certificate(ca_dir, tmp_path / "out", "client-b", role="client")

    assert _cert(a.cert).serial_number != _cert(b.cert).serial_number


def test_bundle_holds_cert_key_and_ca_cert_but_never_the_ca_key(
    ca_dir: Path, tmp_path: Path, client: CertPaths
) -> None:
    bundle = tmp_path / "client-1"

    assert sorted(p.name for p in bundle.iterdir()) == ["ca.pem", "client-1.key", "client-1.pem"]
    assert client.ca.read_bytes() == (ca_dir / "ca.pem").read_bytes()


@posix_only
def test_issued_key_is_owner_only(client: CertPaths, server: CertPaths) -> None:
    assert _mode(client.key) == 0o600
    assert _mode(server.key) == 0o600


def test_server_certificate_without_hosts_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="--host"):
        issue_certificate(ca_dir, tmp_path / "out", "coordinator", role="server")

    assert not (tmp_path / "out").exists()


def test_client_certificate_with_hosts_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="client certificate"):
        issue_certificate(ca_dir, tmp_path / "out", "client-1", role="client", hosts=["localhost"])


@pytest.mark.parametrize(
    "name",
    [
        *("", "a" * 65, "client 1", "../escape", "a/b", "-client", ".hidden", "clïent", "ca", "CA"),
        *("client-1\n2026-12-04 INFO forged", "client-1\r", "site\x1b[31m", "site\u2028x"),
    ],
)
def test_invalid_names_are_rejected(ca_dir: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(PKIError, match="name"):
        issue_certificate(ca_dir, tmp_path / "out", name, role="client")

    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["c", "a" * 64, "client-1", "site_A.hospital-2"])
def test_valid_names_are_accepted(ca_dir: Path, tmp_path: Path, name: str) -> None:
    paths = issue_certificate(ca_dir, tmp_path / "out", name, role="client")

    assert paths.cert.name == f"{name}.pem"


def test_issue_refuses_to_overwrite_an_existing_certificate(
    ca_dir: Path, tmp_path: Path, client: CertPaths
) -> None:
    before = client.key.read_bytes()

    with pytest.raises(PKIError, match=r"already exists.*--force"):
        issue_certificate(ca_dir, tmp_path / "client-1", "client-1", role="client")

    assert client.key.read_bytes() == before


@posix_only
def test_issue_with_force_replaces_the_pair_and_keeps_the_key_private(
    ca_dir: Path, tmp_path: Path, client: CertPaths
) -> None:
    before = client.key.read_bytes()
    client.key.chmod(0o644)

    issue_certificate(ca_dir, tmp_path / "client-1", "client-1", role="client", force=True)

    assert client.key.read_bytes() != before
    assert _mode(client.key) == 0o600
    load_credentials(client.cert, client.key, client.ca)


def test_issue_refuses_a_bundle_directory_holding_another_federations_ca(
    ca_dir: Path, tmp_path: Path, client: CertPaths
) -> None:
    other_ca = tmp_path / "other-ca"
    init_ca(other_ca)

    with pytest.raises(PKIError, match="different CA"):
        issue_certificate(other_ca, tmp_path / "client-1", "client-2", role="client")


def test_issue_without_a_ca_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="fedlink certs init"):
        issue_certificate(tmp_path / "nowhere", tmp_path / "out", "client-1", role="client")


# --- load_credentials ----------------------------------------------------------------------------


def test_load_credentials_returns_the_three_pem_files(client: CertPaths) -> None:
    creds = load_credentials(client.cert, client.key, client.ca, role="client")

    assert creds == Credentials(
        cert_pem=client.cert.read_bytes(),
        key_pem=client.key.read_bytes(),
        ca_pem=client.ca.read_bytes(),
    )


def test_credentials_repr_never_shows_the_private_key(client: CertPaths) -> None:
    creds = load_credentials(client.cert, client.key, client.ca)

    assert "PRIVATE KEY" not in repr(creds)
    assert "key_pem" not in repr(creds)


def test_load_credentials_names_a_missing_file_and_how_to_issue_it(client: CertPaths) -> None:
    missing = client.cert.with_name("nobody.pem")

    with pytest.raises(PKIError, match=r"nobody\.pem.*fedlink certs issue"):
        load_credentials(missing, client.key, client.ca)


def test_load_credentials_rejects_a_key_that_does_not_match_the_certificate(
    client: CertPaths, server: CertPaths
) -> None:
    with pytest.raises(PKIError, match="does not match"):
        load_credentials(client.cert, server.key, client.ca)


def test_load_credentials_rejects_a_certificate_from_another_ca(
    client: CertPaths, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca"
    init_ca(other)

    with pytest.raises(PKIError, match="not issued by the CA"):
        load_credentials(client.cert, client.key, other / "ca.pem")


def test_load_credentials_rejects_a_forged_certificate_with_the_cas_name(
    ca_dir: Path, client: CertPaths, tmp_path: Path
) -> None:
    # Same subject as the real CA, different key: only the signature check can tell them apart.
    impostor = tmp_path / "impostor"
    init_ca(impostor)
    forged = issue_certificate(impostor, tmp_path / "forged", "client-1", role="client")

    with pytest.raises(PKIError, match="not issued by the CA"):
        load_credentials(forged.cert, forged.key, client.ca)


def test_load_credentials_rejects_an_expired_certificate_with_its_date(
    ca_dir: Path, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    paths = _sign_with_ca(
        ca_dir,
        not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=2),
        out_dir=tmp_path / "old",
    )
    expiry = f"{now - dt.timedelta(days=2):%Y-%m-%d}"

    with pytest.raises(
        PKIError, match=rf"old-client\.pem expired on {expiry}.*fedlink certs issue"
    ):
        load_credentials(paths.cert, paths.key, paths.ca)


def test_certificate_issued_for_zero_days_is_already_expired(ca_dir: Path, tmp_path: Path) -> None:
    paths = issue_certificate(ca_dir, tmp_path / "out", "client-1", role="client", days=0)

    with pytest.raises(PKIError, match="expired on"):
        load_credentials(paths.cert, paths.key, paths.ca)


def test_load_credentials_rejects_a_certificate_that_is_not_yet_valid(
    ca_dir: Path, tmp_path: Path
) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    paths = _sign_with_ca(
        ca_dir,
        not_before=now + dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=30),
        out_dir=tmp_path / "future",
    )

    with pytest.raises(PKIError, match=r"not valid until.*clock"):
        load_credentials(paths.cert, paths.key, paths.ca)


def test_load_credentials_rejects_the_ca_certificate_as_a_participant_certificate(
    ca_dir: Path,
) -> None:
    with pytest.raises(PKIError, match="is a CA certificate"):
        load_credentials(ca_dir / "ca.pem", ca_dir / "ca.key", ca_dir / "ca.pem")


def test_load_credentials_checks_the_role_when_asked(client: CertPaths, server: CertPaths) -> None:
    load_credentials(server.cert, server.key, server.ca, role="server")

    with pytest.raises(PKIError, match=r"not a server certificate.*--server"):
        load_credentials(client.cert, client.key, client.ca, role="server")


def test_load_credentials_refuses_a_sha1_signature_and_a_certificate_without_its_role(
    ca_dir: Path, tmp_path: Path
) -> None:
    ca = Signer.load(ca_dir)
    cert, key = forge_sha1(ca, "old-tool").write(tmp_path, "old-tool")
    with pytest.raises(PKIError, match=r"old-tool.pem is signed with SHA1, which can be forged"):
        load_credentials(cert, key, ca_dir / "ca.pem")
    cert, key = forge(ca, "no-usage", eku=False).write(tmp_path, "no-usage")
    load_credentials(cert, key, ca_dir / "ca.pem")  # no role asked for
    with pytest.raises(PKIError, match=r"not a client certificate \(no client-auth extended key"):
        load_credentials(cert, key, ca_dir / "ca.pem", role="client")


@posix_only
def test_load_credentials_warns_about_a_key_readable_by_others(
    client: CertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    client.key.chmod(0o644)

    with caplog.at_level(logging.WARNING, logger="fedlink.common.pki"):
        load_credentials(client.cert, client.key, client.ca)

    assert "chmod 600" in caplog.text
    assert "PRIVATE KEY" not in caplog.text


@posix_only
def test_load_credentials_is_quiet_about_an_owner_only_key(
    client: CertPaths, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedlink.common.pki"):
        load_credentials(client.cert, client.key, client.ca)

    assert caplog.records == []


# --- peer_certificate ----------------------------------------------------------------------------


def test_peer_certificate_names_the_common_name_serial_and_validity(
    client: CertPaths, server: CertPaths
) -> None:
    peer = peer_certificate(client.cert.read_bytes(), (client.ca).read_bytes())
    issued = _cert(client.cert)
    assert peer.identity == "client-1"
    assert peer.serial == issued.serial_number
    assert (peer.not_before, peer.not_after) == (
        issued.not_valid_before_utc,
        issued.not_valid_after_utc,
    )
    with pytest.raises(PKIError, match="is not a client certificate"):
        peer_certificate(server.cert.read_bytes(), server.ca.read_bytes())


def test_peer_certificate_rejects_garbage(client: CertPaths) -> None:
    with pytest.raises(PKIError):
        peer_certificate(b"not a certificate", client.ca.read_bytes())


# --- the admin role ------------------------------------------------------------------------------


@pytest.fixture
def admin(ca_dir: Path, tmp_path: Path) -> CertPaths:
    return issue_certificate(ca_dir, tmp_path / "operator", "operator", role="admin")


def test_admin_certificate_is_a_tls_client_with_the_fedlink_admin_usage(admin: CertPaths) -> None:
    usages = list(_cert(admin.cert).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH, ADMIN_USAGE]
    assert ADMIN_USAGE.dotted_string.startswith("2.25.")  # a UUID OID: no registered arc needed
    assert load_credentials(admin.cert, admin.key, admin.ca, role="admin")


def test_each_role_refuses_the_other_roles_certificates(
    admin: CertPaths, client: CertPaths, server: CertPaths
) -> None:
    ca_pem = admin.ca.read_bytes()
    assert peer_certificate(admin.cert.read_bytes(), ca_pem, "admin").identity == "operator"
    with pytest.raises(PKIError, match="is an admin certificate"):
        peer_certificate(admin.cert.read_bytes(), ca_pem)  # a client's role
    with pytest.raises(PKIError, match="is not an admin certificate"):
        peer_certificate(client.cert.read_bytes(), ca_pem, "admin")
    with pytest.raises(PKIError, match="client-auth"):
        peer_certificate(server.cert.read_bytes(), ca_pem, "admin")
    with pytest.raises(PKIError, match="is an admin certificate"):
        load_credentials(admin.cert, admin.key, admin.ca, role="client")
    with pytest.raises(PKIError, match="not a server certificate"):
        load_credentials(admin.cert, admin.key, admin.ca, role="server")


def test_a_certificate_that_could_be_admin_and_server_is_refused_for_either(
    ca_dir: Path, tmp_path: Path
) -> None:
    ca_cert = _cert(ca_dir / "ca.pem")
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH, ADMIN_USAGE]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "both")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    ).public_bytes(serialization.Encoding.PEM)
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    with pytest.raises(PKIError, match="role is ambiguous"):
        peer_certificate(cert, ca_pem, "admin")
    with pytest.raises(PKIError, match="is an admin certificate"):
        peer_certificate(cert, ca_pem, "client")


def test_admin_certificates_carry_no_hosts(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="admin certificate 'op' cannot carry hosts"):
        issue_certificate(ca_dir, tmp_path / "op", "op", role="admin", hosts=["localhost"])


# --- revocation ----------------------------------------------------------------------------------


def test_revoke_writes_a_crl_signed_by_the_ca_listing_the_serial(
    ca_dir: Path, client: CertPaths
) -> None:
    result = revoke_certificate(ca_dir, cert=client.cert, reason=x509.ReasonFlags.key_compromise)

    assert result.crl == ca_dir / "crl.pem" and not result.already_revoked
    crl = x509.load_pem_x509_crl(result.crl.read_bytes())
    ca_cert = _cert(ca_dir / "ca.pem")
    ca_key = ca_cert.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert crl.is_signature_valid(ca_key)
    assert crl.issuer == ca_cert.subject
    entry = crl.get_revoked_certificate_by_serial_number(_cert(client.cert).serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason == x509.ReasonFlags.key_compromise
    loaded = load_revocation_list(result.crl, (ca_dir / "ca.pem").read_bytes())
    assert set(loaded.revoked) == {_cert(client.cert).serial_number}
    assert loaded.number == 1


def test_revoking_again_keeps_earlier_entries_and_raises_the_crl_number(
    ca_dir: Path, client: CertPaths, tmp_path: Path
) -> None:
    other = issue_certificate(ca_dir, tmp_path / "c2", "client-2", role="client")
    revoke_certificate(ca_dir, cert=client.cert)
    revoke_certificate(ca_dir, serial=0xABC)
    result = revoke_certificate(ca_dir, cert=other.cert)
    again = revoke_certificate(ca_dir, cert=other.cert)

    loaded = load_revocation_list(result.crl, (ca_dir / "ca.pem").read_bytes())
    assert set(loaded.revoked) == {
        _cert(client.cert).serial_number,
        0xABC,
        _cert(other.cert).serial_number,
    }
    assert loaded.number == 3
    assert again.already_revoked and again.total == 3


def test_revoke_refuses_a_certificate_from_another_ca(ca_dir: Path, tmp_path: Path) -> None:
    init_ca(tmp_path / "other-ca")
    foreign = issue_certificate(tmp_path / "other-ca", tmp_path / "f", "client-1", role="client")
    with pytest.raises(PKIError, match="not issued by the CA"):
        revoke_certificate(ca_dir, cert=foreign.cert)
    assert not (ca_dir / "crl.pem").exists()


def test_a_crl_signed_by_another_ca_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    init_ca(tmp_path / "other-ca", name="fedlink federation CA")  # same name, other key
    crl = revoke_certificate(tmp_path / "other-ca", serial=5).crl
    with pytest.raises(PKIError, match="invalid signature"):
        load_revocation_list(crl, (ca_dir / "ca.pem").read_bytes())


def test_a_tampered_or_garbage_crl_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    crl = revoke_certificate(ca_dir, serial=5).crl
    der = x509.load_pem_x509_crl(crl.read_bytes()).public_bytes(serialization.Encoding.DER)
    tampered = bytearray(der)
    index = der.index((5).to_bytes(1, "big") + b"\x17")  # serial 5, then the revocation UTCTime
    tampered[index] = 6
    forged = tmp_path / "forged.pem"
    forged.write_bytes(
        x509.load_der_x509_crl(bytes(tampered)).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(PKIError, match="invalid signature"):
        load_revocation_list(forged, (ca_dir / "ca.pem").read_bytes())
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a crl")
    with pytest.raises(PKIError, match="not a PEM certificate revocation list"):
        load_revocation_list(garbage, (ca_dir / "ca.pem").read_bytes())
    with pytest.raises(PKIError, match=r"not found; copy crl\.pem from the CA directory"):
        load_revocation_list(tmp_path / "missing.pem", (ca_dir / "ca.pem").read_bytes())


def test_revoke_needs_exactly_one_certificate(ca_dir: Path, client: CertPaths) -> None:
    with pytest.raises(PKIError, match="--cert FILE or --serial N"):
        revoke_certificate(ca_dir)
    with pytest.raises(PKIError, match="--cert FILE or --serial N"):
        revoke_certificate(ca_dir, cert=client.cert, serial=1)


# --- fedlink certs -------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedlink")
    add_certs_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


def test_cli_init_and_issue_write_a_usable_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca, out = tmp_path / "ca", tmp_path / "srv"

    assert _cli("certs", "init", "--dir", str(ca)) == 0
    issue = ["--ca-dir", str(ca), "--out", str(out), "--name", "coordinator", "--server"]
    hosts = ["--host", "localhost", "--host", "127.0.0.1", "::1"]
    assert _cli("certs", "issue", *issue, *hosts) == 0

    printed = capsys.readouterr().out
    assert str(out / "coordinator.pem") in printed
    assert str(out / "coordinator.key") in printed
    load_credentials(out / "coordinator.pem", out / "coordinator.key", out / "ca.pem")
    san = _cert(out / "coordinator.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert len(san.value.get_values_for_type(x509.IPAddress)) == 2


def test_cli_reports_a_pki_error_on_stderr_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = tmp_path / "ca"
    assert _cli("certs", "init", "--dir", str(ca)) == 0

    code = _cli(
        "certs",
        "issue",
        "--ca-dir",
        str(ca),
        "--out",
        str(tmp_path / "srv"),
        "--server",
        "--name",
        "srv",
    )

    assert code == 2
    assert "--host" in capsys.readouterr().err


def test_cli_requires_exactly_one_role(tmp_path: Path) -> None:
    common = ["certs", "issue", "--ca-dir", str(tmp_path), "--out", str(tmp_path), "--name", "x"]
    with pytest.raises(SystemExit):
        _cli(*common)
    with pytest.raises(SystemExit):
        _cli(*common, "--server", "--client")


def test_cli_revoke_takes_a_file_or_a_hex_serial(
    ca_dir: Path, client: CertPaths, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli("certs", "revoke", "--ca-dir", str(ca_dir), "--cert", str(client.cert)) == 0
    assert _cli("certs", "revoke", "--ca-dir", str(ca_dir), "--serial", "0a:bc") == 0
    printed = capsys.readouterr().out
    assert f"revoked serial {_cert(client.cert).serial_number:x}" in printed
    assert "(2 revoked)" in printed
    revoked = load_revocation_list(ca_dir / "crl.pem", (ca_dir / "ca.pem").read_bytes()).revoked
    assert set(revoked) == {_cert(client.cert).serial_number, 0xABC}
    assert _cli("certs", "revoke", "--ca-dir", str(ca_dir / "missing"), "--serial", "1") == 2
    assert "no federation CA" in capsys.readouterr().err


@pytest.mark.parametrize("serial", ["ff" * 21, "1" * 41, "-5", "0"])
def test_cli_revoke_refuses_an_impossible_serial_in_one_line(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], serial: str
) -> None:
    assert _cli("certs", "revoke", "--ca-dir", str(ca_dir), "--serial", serial) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "at most 40 hex digits" in err
    assert not (ca_dir / "crl.pem").exists()


def test_cli_revoke_refuses_a_malformed_serial_without_a_traceback(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _cli("certs", "revoke", "--ca-dir", str(ca_dir), "--serial", "zz:12")
    assert exited.value.code == 2
    assert "expected a hex serial number, got 'zz:12'" in capsys.readouterr().err


def test_a_signed_statement_verifies_only_for_its_signer_under_the_federation_ca(
    ca_dir: Path, client: CertPaths, server: CertPaths, tmp_path: Path
) -> None:
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    cert_pem = client.cert.read_bytes()
    name = peer_certificate(cert_pem, ca_pem).identity
    signature = sign_statement(client.key.read_bytes(), b"keys for round 7")
    verify_statement(cert_pem, ca_pem, name, b"keys for round 7", signature)
    with pytest.raises(PKIError, match="signature is not"):
        verify_statement(cert_pem, ca_pem, name, b"keys for round 8", signature)
    with pytest.raises(PKIError, match="names"):
        verify_statement(cert_pem, ca_pem, "someone-else", b"keys for round 7", signature)
    server_signature = sign_statement(server.key.read_bytes(), b"x")
    with pytest.raises(PKIError, match="not a client certificate"):
        verify_statement(server.cert.read_bytes(), ca_pem, "server", b"x", server_signature)
    other_ca = tmp_path / "other-ca"
    init_ca(other_ca)
    with pytest.raises(PKIError, match="not issued by the federation CA"):
        verify_statement(
            cert_pem, (other_ca / "ca.pem").read_bytes(), name, b"keys for round 7", signature
        )


def test_a_certificate_checked_once_is_not_checked_again_but_every_signature_is(
    ca_dir: Path, client: CertPaths
) -> None:
    # Secure-aggregation rosters repeat the same certificates every round: the chain, role and
    # name checks are kept per (certificate, CA, identity); validity and signature never are.
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    cert_pem = client.cert.read_bytes()
    name = peer_certificate(cert_pem, ca_pem).identity
    signature = sign_statement(client.key.read_bytes(), b"round 1")
    verify_statement(cert_pem, ca_pem, name, b"round 1", signature)
    hits = pki_module._statement_signer.cache_info().hits
    verify_statement(cert_pem, ca_pem, name, b"round 1", signature)
    assert pki_module._statement_signer.cache_info().hits == hits + 1
    with pytest.raises(PKIError, match="signature is not"):
        verify_statement(cert_pem, ca_pem, name, b"round 2", signature)
