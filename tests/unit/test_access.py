"""Tests for the coordinator's access checks: the policy, revocation reloading and sessions."""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
from pathlib import Path

import pytest

from fedlink.common.errors import AccessDenied
from fedlink.common.pki import (
    CertPaths,
    PeerCertificate,
    init_ca,
    issue_certificate,
    peer_certificate,
    revoke_certificate,
)
from fedlink.server.access import AccessPolicy, RevocationWatch, Sessions

NOW = dt.datetime(2030, 6, 1, 12, 0, tzinfo=dt.timezone.utc)


def _peer(name: str = "site-a", serial: int = 42, days: int = 30) -> PeerCertificate:
    return PeerCertificate(
        identity=name,
        serial=serial,
        not_before=NOW - dt.timedelta(days=days),
        not_after=NOW + dt.timedelta(days=days),
    )


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


def test_an_empty_allow_list_admits_any_identity() -> None:
    AccessPolicy(clock=lambda: NOW).check(_peer("anyone"))


def test_the_allow_list_admits_only_its_names() -> None:
    policy = AccessPolicy(["site-a", "site-b"], clock=lambda: NOW)
    policy.check(_peer("site-b"))
    denied = _denied(policy, _peer("site-c"))
    assert denied.code == "PERMISSION_DENIED"
    assert "'site-c' is not on this federation's allow-list" in str(denied)


def test_validity_is_checked_against_the_clock_with_a_message_naming_the_date() -> None:
    peer = _peer(days=1)
    later = AccessPolicy(clock=lambda: NOW + dt.timedelta(days=2))
    denied = _denied(later, peer)
    assert denied.code == "UNAUTHENTICATED"
    assert "expired on 2030-06-02 12:00:00 UTC" in str(denied)
    earlier = AccessPolicy(clock=lambda: NOW - dt.timedelta(days=2))
    denied = _denied(earlier, peer)
    assert denied.code == "UNAUTHENTICATED"
    assert "is not valid until 2030-05-31 12:00:00 UTC" in str(denied)


def test_a_revoked_serial_is_refused_and_the_list_reloads_when_the_file_changes(
    ca_dir: Path, client: CertPaths, tmp_path: Path
) -> None:
    revoke_certificate(ca_dir, serial=1)
    deployed = tmp_path / "deployed-crl.pem"
    shutil.copy(ca_dir / "crl.pem", deployed)
    policy = AccessPolicy(revocations=RevocationWatch(deployed, (ca_dir / "ca.pem").read_bytes()))
    peer = peer_certificate(client.cert.read_bytes())
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
    watch = RevocationWatch(deployed, (ca_dir / "ca.pem").read_bytes())
    policy = AccessPolicy(revocations=watch)
    peer = peer_certificate(client.cert.read_bytes())

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
