"""Tests for the coordinator's access checks: the policy, revocation reloading and sessions."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from forged import Signer, forge, forge_sha1, self_signed_ca

from fedlink.common.errors import AccessDenied, PKIError
from fedlink.common.pki import (
    CertPaths,
    PeerCertificate,
    init_ca,
    issue_certificate,
    peer_certificate,
    revoke_certificate,
)
from fedlink.server.access import CRL_NUMBER_FILE, AccessPolicy, RevocationWatch, Sessions

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


def _peer(name: str = "site-a", serial: int = 42, days: int = 30) -> PeerCertificate:
    return PeerCertificate(
        identity=name,
        serial=serial,
        not_before=NOW - dt.timedelta(days=days),
        not_after=NOW + dt.timedelta(days=days),
    )


def _policy(ca_dir: Path, *allowed: str, at: dt.datetime = NOW) -> AccessPolicy:
    return AccessPolicy((ca_dir / "ca.pem").read_bytes(), allowed, clock=lambda: at)


def _denied(policy: AccessPolicy, peer: PeerCertificate) -> AccessDenied:
    with pytest.raises(AccessDenied) as denied:
        policy.check(peer)
    return denied.value


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    init_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def client(ca_dir: Path, tmp_path: Path) -> CertPaths:
    return issue_certificate(ca_dir, tmp_path / "site-a", "site-a", role="client")


def test_an_empty_allow_list_admits_any_identity(ca_dir: Path) -> None:
    _policy(ca_dir).check(_peer("anyone"))


def test_the_allow_list_admits_only_its_names(ca_dir: Path) -> None:
    policy = _policy(ca_dir, "site-a", "site-b")
    policy.check(_peer("site-b"))
    denied = _denied(policy, _peer("site-c"))
    assert denied.code == "PERMISSION_DENIED"
    assert "'site-c' is not on this federation's allow-list" in str(denied)


def test_validity_is_checked_against_the_clock_with_a_message_naming_the_date(
    ca_dir: Path,
) -> None:
    peer = _peer(days=1)
    later = _policy(ca_dir, at=NOW + dt.timedelta(days=2))
    denied = _denied(later, peer)
    assert denied.code == "UNAUTHENTICATED"
    assert "expired on 2030-06-02 12:00:00 UTC" in str(denied)
    earlier = _policy(ca_dir, at=NOW - dt.timedelta(days=2))
    denied = _denied(earlier, peer)
    assert denied.code == "UNAUTHENTICATED"
    assert "is not valid until 2030-05-31 12:00:00 UTC" in str(denied)


def test_a_revoked_serial_is_refused_and_the_list_reloads_when_the_file_changes(
    ca_dir: Path, client: CertPaths, tmp_path: Path
) -> None:
    revoke_certificate(ca_dir, serial=1)
    deployed = tmp_path / "deployed-crl.pem"
    shutil.copy(ca_dir / "crl.pem", deployed)
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    policy = AccessPolicy(ca_pem, revocations=RevocationWatch(deployed, ca_pem, tmp_path))
    peer = peer_certificate(client.cert.read_bytes(), ca_pem)
    policy.check(peer)

    revoke_certificate(ca_dir, cert=client.cert)
    shutil.copy(ca_dir / "crl.pem", deployed)
    denied = _denied(policy, peer)
    assert denied.code == "PERMISSION_DENIED"
    assert f"(serial {peer.serial:x}) was revoked on" in str(denied)


def test_a_bad_or_older_replacement_list_is_logged_and_the_last_good_one_stays(
    ca_dir: Path, client: CertPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    revoke_certificate(ca_dir, serial=1)
    older = tmp_path / "older.pem"
    shutil.copy(ca_dir / "crl.pem", older)
    revoke_certificate(ca_dir, cert=client.cert)
    deployed = tmp_path / "deployed-crl.pem"
    shutil.copy(ca_dir / "crl.pem", deployed)
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    watch = RevocationWatch(deployed, ca_pem, tmp_path / "state")
    policy = AccessPolicy(ca_pem, revocations=watch)
    peer = peer_certificate(client.cert.read_bytes(), ca_pem)

    with caplog.at_level(logging.ERROR, logger="fedlink.server.access"):
        deployed.write_text("half-copied garbage")
        _denied(policy, peer)
        deployed.unlink()  # gone for a moment (mid-replacement): the list stays in force
        _denied(policy, peer)
        shutil.copy(older, deployed)  # a rollback to a list that does not revoke site-a yet
        os.utime(deployed, ns=(1, 1))
        _denied(policy, peer)
    messages = [r.getMessage() for r in caplog.records]
    assert any("not a PEM certificate revocation list" in m for m in messages)
    assert any("CRL number 1, older than the loaded 2" in m for m in messages)
    assert watch.current().number == 2


def test_a_new_session_supersedes_the_old_one_and_calls_without_a_token_act_for_it() -> None:
    sessions = Sessions(clock=lambda: NOW)
    first, superseded = sessions.open("site-a", "ipv4:10.0.0.1:5000")
    assert not superseded
    sessions.check("site-a", first)
    second, superseded = sessions.open("site-a", "ipv4:10.0.0.2:6000")
    assert superseded and second != first
    sessions.check("site-a", second)
    sessions.check("site-a", None)
    with pytest.raises(AccessDenied) as denied:
        sessions.check("site-a", first)
    assert denied.value.code == "FAILED_PRECONDITION"
    assert "joined again at 12:00:00 UTC from ipv4:10.0.0.2:6000" in str(denied.value)
    assert sessions.identity_of(second) == "site-a"
    assert sessions.identity_of(first) is None


def test_an_identity_without_a_session_is_told_to_join() -> None:
    with pytest.raises(AccessDenied, match="call Join first") as denied:
        Sessions().check("site-a", None)
    assert denied.value.code == "FAILED_PRECONDITION"


# --- identity edges: certificates the federation CA signed that fedlink would never issue -----


def _refused_identity(ca_dir: Path, cert_pem: bytes) -> AccessDenied:
    with pytest.raises(AccessDenied) as denied:
        AccessPolicy((ca_dir / "ca.pem").read_bytes()).identify(cert_pem)
    assert denied.value.code == "UNAUTHENTICATED"
    return denied.value


def test_a_leaf_from_an_intermediate_the_ca_signed_is_refused_whatever_its_name(
    ca_dir: Path,
) -> None:
    intermediate = forge(Signer.load(ca_dir), "intermediate", ca=True)
    leaf = forge(intermediate.as_signer(), "site-a")
    denied = _refused_identity(ca_dir, leaf.cert_pem)
    assert "not issued by the federation CA itself" in str(denied)
    assert "no intermediates" in str(denied)


def test_a_client_certificate_with_ca_true_is_refused(ca_dir: Path) -> None:
    denied = _refused_identity(ca_dir, forge(Signer.load(ca_dir), "site-a", ca=True).cert_pem)
    assert "is a CA certificate (CA:TRUE)" in str(denied)


def test_a_certificate_without_client_auth_usage_is_refused(ca_dir: Path) -> None:
    denied = _refused_identity(ca_dir, forge(Signer.load(ca_dir), "site-a", eku=False).cert_pem)
    assert "is not a client certificate (no client-auth extended key usage)" in str(denied)


def test_sha1_signatures_and_small_rsa_keys_are_refused(ca_dir: Path) -> None:
    ca = Signer.load(ca_dir)
    sha1 = forge_sha1(ca, "site-a")
    assert "is signed with SHA1, which can be forged" in str(
        _refused_identity(ca_dir, sha1.cert_pem)
    )
    small = forge(ca, "site-a", key=rsa.generate_private_key(65537, 1024))
    assert "holds a 1024-bit RSA key" in str(_refused_identity(ca_dir, small.cert_pem))
    big = forge(ca, "site-b", key=rsa.generate_private_key(65537, 2048))
    policy = AccessPolicy((ca_dir / "ca.pem").read_bytes())
    assert policy.identify(big.cert_pem).identity == "site-b"


# The cryptography library warns about the 65-character name it is asked to write and read.
@pytest.mark.filterwarnings("ignore:Attribute's length must be")
@pytest.mark.parametrize(
    "name", ["site-a\n2030-06-01 12:00:00 INFO forged line", "site\x1b[31m", "s" * 65, "a b"]
)
def test_a_name_fedlink_would_not_issue_is_refused_and_shown_escaped(
    ca_dir: Path, name: str
) -> None:
    denied = str(_refused_identity(ca_dir, forge(Signer.load(ca_dir), name).cert_pem))
    assert "which is not a fedlink name" in denied
    assert denied.isprintable() and len(denied) < 400


def test_an_expired_ca_ends_every_certificates_authorisation(ca_dir: Path) -> None:
    ca = self_signed_ca("short CA", NOW + dt.timedelta(days=1))
    policy = AccessPolicy(ca.cert_pem, clock=lambda: NOW + dt.timedelta(days=2))
    denied = _denied(policy, _peer(days=30))
    assert denied.code == "UNAUTHENTICATED"
    assert "the federation CA is valid from" in str(denied)
    assert "`fedlink certs init --force`" in str(denied)


def test_a_rolled_back_list_is_refused_at_start_up_after_a_newer_one_was_seen(
    ca_dir: Path, client: CertPaths, tmp_path: Path
) -> None:
    ca_pem = (ca_dir / "ca.pem").read_bytes()
    state = tmp_path / "state"
    revoke_certificate(ca_dir, serial=1)
    older = tmp_path / "older.pem"
    shutil.copy(ca_dir / "crl.pem", older)
    revoke_certificate(ca_dir, cert=client.cert)
    deployed = tmp_path / "deployed.pem"
    shutil.copy(older, deployed)
    watch = RevocationWatch(deployed, ca_pem, state)  # number 1: recorded
    assert (state / CRL_NUMBER_FILE).read_text() == "1\n"
    shutil.copy(ca_dir / "crl.pem", deployed)
    os.utime(deployed, ns=(10**18, 10**18))
    assert watch.current().number == 2
    assert (state / CRL_NUMBER_FILE).read_text() == "2\n"  # a reload records it too

    shutil.copy(older, deployed)  # the restart finds the older list
    with pytest.raises(PKIError, match="has CRL number 1, older than number 2 this coordinator"):
        RevocationWatch(deployed, ca_pem, state)
    shutil.copy(ca_dir / "crl.pem", deployed)
    assert RevocationWatch(deployed, ca_pem, state).current().number == 2
