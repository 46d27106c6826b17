"""Mutual TLS against a live coordinator: only certificates from the federation CA get in, and
the identity the coordinator uses is the certificate's, never a message field."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlink.common.pki import init_ca, issue_certificate
from fedlink.common.tensors import StateDict
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc


def _join(address: str, credentials: grpc.ChannelCredentials) -> pb.JoinReply:
    with grpc.secure_channel(address, credentials) as channel:
        return pb_grpc.FederationStub(channel).Join(pb.JoinRequest(), timeout=10)


def _self_signed(tmp: Path, name: str) -> tuple[bytes, bytes]:
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
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@pytest.fixture
def coordinator(start_coordinator: Any, small_state: StateDict) -> Any:
    return start_coordinator(small_state, num_rounds=1, min_clients=50)


def test_a_federation_certificate_joins_and_its_name_is_the_identity(
    pki: Any, coordinator: Any
) -> None:
    cert, key, ca = pki.client("hospital-a")
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes(), cert.read_bytes())
    assert _join(coordinator.address, credentials).identity == "hospital-a"


def test_a_client_without_a_certificate_is_refused(pki: Any, coordinator: Any) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca_pem.read_bytes())
    with pytest.raises(grpc.RpcError) as refused:
        _join(coordinator.address, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_self_signed_client_certificate_is_refused(
    pki: Any, coordinator: Any, tmp_path: Path
) -> None:
    cert, key = _self_signed(tmp_path, "hospital-a")  # claims a real participant's name
    credentials = grpc.ssl_channel_credentials(pki.ca_pem.read_bytes(), key, cert)
    with pytest.raises(grpc.RpcError) as refused:
        _join(coordinator.address, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_is_refused(
    pki: Any, coordinator: Any, tmp_path: Path
) -> None:
    init_ca(tmp_path / "rogue-ca")
    paths = issue_certificate(
        tmp_path / "rogue-ca", tmp_path / "rogue", "hospital-a", role="client"
    )
    credentials = grpc.ssl_channel_credentials(
        pki.ca_pem.read_bytes(), paths.key.read_bytes(), paths.cert.read_bytes()
    )
    with pytest.raises(grpc.RpcError) as refused:
        _join(coordinator.address, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_server_certificate_cannot_be_used_as_a_client_certificate(
    pki: Any, coordinator: Any
) -> None:
    credentials = grpc.ssl_channel_credentials(
        pki.ca_pem.read_bytes(),
        (pki.server_dir / "server.key").read_bytes(),
        (pki.server_dir / "server.pem").read_bytes(),
    )
    with pytest.raises(grpc.RpcError):
        _join(coordinator.address, credentials)


def test_a_plaintext_client_cannot_talk_to_the_coordinator(coordinator: Any) -> None:
    with (
        grpc.insecure_channel(coordinator.address) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        pb_grpc.FederationStub(channel).Join(pb.JoinRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_refuses_a_coordinator_from_another_federation(
    pki: Any, coordinator: Any, tmp_path: Path
) -> None:
    init_ca(tmp_path / "other-ca")
    cert, key, _ = pki.client("hospital-b")
    credentials = grpc.ssl_channel_credentials(
        (tmp_path / "other-ca" / "ca.pem").read_bytes(), key.read_bytes(), cert.read_bytes()
    )
    with pytest.raises(grpc.RpcError) as refused:
        _join(coordinator.address, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_server_will_not_start_without_certificates_unless_insecure_is_explicit(
    tmp_path: Path,
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fedlink", "server", "--num-rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "fedlink certs" in result.stderr
    assert "--insecure" in result.stderr


def test_the_standard_health_service_answers_over_mtls(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    with pki.channel(coordinator.address, "monitor") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
