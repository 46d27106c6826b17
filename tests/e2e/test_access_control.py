"""Identity and access against a live coordinator over mTLS: the allow-list, revocation (reloaded
without a restart), certificate validity, another CA, one session per identity, and the
per-client and coordinator-wide resource limits."""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import fedlink_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from forged import Forged, Signer, forge, forge_sha1, self_signed_ca

from fedlink.common.pki import init_ca, issue_certificate, revoke_certificate
from fedlink.common.tensors import StateDict, encode_state
from fedlink.common.wire import SESSION_METADATA_KEY, payload_digest
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

Metadata = tuple[tuple[str, str], ...]


def _credentials(cert: bytes, key: bytes, ca: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def _stub(address: str, credentials: grpc.ChannelCredentials) -> pb_grpc.FederationStub:
    return pb_grpc.FederationStub(grpc.secure_channel(address, credentials))


def _join(stub: pb_grpc.FederationStub) -> tuple[pb.JoinReply, Metadata]:
    reply, call = stub.Join.with_call(pb.JoinRequest(), timeout=10)
    token = dict(call.trailing_metadata() or ())[SESSION_METADATA_KEY]
    return reply, ((SESSION_METADATA_KEY, str(token)),)


def _refusal(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as refused:
        result = call(*args, timeout=10, **kwargs)
        if hasattr(result, "__next__"):  # a server stream: the status comes with the first read
            next(result)
    return refused.value


def _timed_certificate(
    pki: Any, name: str, not_before: dt.datetime, not_after: dt.datetime
) -> tuple[bytes, bytes]:
    """A client certificate from the federation CA with the validity period asked for (the CLI
    only issues certificates valid from now)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert = x509.load_pem_x509_certificate(pki.ca_pem.read_bytes())
    ca_key = serialization.load_pem_private_key((pki.ca_dir / "ca.key").read_bytes(), None)
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
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _waiting(start_coordinator: Any, state: StateDict, **overrides: Any) -> Any:
    """A coordinator whose first round never starts, so calls are answered but nothing trains."""
    return start_coordinator(state, num_rounds=1, min_clients=50, **overrides)


# --- allow-list ------------------------------------------------------------------------------


def test_only_allow_listed_identities_may_call(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = _waiting(start_coordinator, small_state, allowed_clients=("hospital-a",))
    allowed = coordinator.stub(pki, "hospital-a")
    assert _join(allowed)[0].identity == "hospital-a"

    stranger = coordinator.stub(pki, "hospital-z")  # signed by the federation CA, not listed
    refused = _refusal(stranger.Join, pb.JoinRequest())
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'hospital-z' is not on this federation's allow-list" in (refused.details() or "")
    assert _refusal(stranger.Heartbeat, pb.HeartbeatRequest()).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert _refusal(stranger.Leave, pb.LeaveRequest(reason="x")).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_another_cas_certificate_with_an_allow_listed_name_is_still_refused(
    pki: Any, start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    coordinator = _waiting(start_coordinator, small_state, allowed_clients=("hospital-a",))
    init_ca(tmp_path / "rogue-ca")
    rogue = issue_certificate(
        tmp_path / "rogue-ca", tmp_path / "rogue", "hospital-a", role="client"
    )
    stub = _stub(
        coordinator.address,
        _credentials(rogue.cert.read_bytes(), rogue.key.read_bytes(), pki.ca_pem.read_bytes()),
    )
    # The TLS handshake refuses it: the call never reaches the coordinator's code.
    assert _refusal(stub.Join, pb.JoinRequest()).code() == grpc.StatusCode.UNAVAILABLE


# --- revocation ------------------------------------------------------------------------------


def test_a_revoked_certificate_is_refused_from_its_next_call_without_a_restart(
    pki: Any, start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    shutil.copytree(pki.ca_dir, ca_dir)  # a private copy: this test's revocations stay here
    revoke_certificate(ca_dir, serial=12345)  # someone else, long ago
    deployed = tmp_path / "coordinator-crl.pem"
    shutil.copy(ca_dir / "crl.pem", deployed)
    coordinator = _waiting(start_coordinator, small_state, revocation_list=deployed)
    stub = coordinator.stub(pki, "to-be-revoked")
    _, session = _join(stub)
    stub.Heartbeat(pb.HeartbeatRequest(), metadata=session, timeout=10)
    bystander = coordinator.stub(pki, "bystander")
    _join(bystander)

    cert, _, _ = pki.client("to-be-revoked")
    revoke_certificate(ca_dir, cert=cert)
    shutil.copy(ca_dir / "crl.pem", deployed)

    # Same connection, next call: refused, and so is a new Join.
    refused = _refusal(stub.Heartbeat, pb.HeartbeatRequest(), metadata=session)
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'to-be-revoked'" in (refused.details() or "")
    assert "was revoked on" in (refused.details() or "")
    assert _refusal(stub.Join, pb.JoinRequest()).code() == grpc.StatusCode.PERMISSION_DENIED
    assert _refusal(stub.PullTask, pb.PullTaskRequest()).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    bystander.Heartbeat(pb.HeartbeatRequest(), timeout=10)


def test_a_revoked_participant_is_dropped_from_the_round_it_is_in(
    pki: Any, start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    shutil.copytree(pki.ca_dir, ca_dir)
    revoke_certificate(ca_dir, serial=1)
    deployed = tmp_path / "crl.pem"
    shutil.copy(ca_dir / "crl.pem", deployed)
    coordinator = start_coordinator(
        small_state,
        num_rounds=1,
        min_clients=2,
        min_fit_clients=2,
        evaluate_every=0,
        revocation_list=deployed,
        round_timeout_seconds=300,
    )
    stubs = {name: coordinator.stub(pki, name) for name in ("honest", "compromised")}
    for stub in stubs.values():
        _join(stub)
    tasks = {
        name: next(iter(stub.PullTask(pb.PullTaskRequest(), timeout=30))).header
        for name, stub in stubs.items()
    }
    update = {k: v + 1 if v.dtype.is_floating_point else v for k, v in small_state.items()}
    payload = encode_state(update)
    info = pb.PayloadInfo(size=len(payload), blake3=payload_digest(payload), encoding="safetensors")
    header = pb.ResultHeader(task_id=tasks["honest"].task_id, round=1, num_examples=1, payload=info)
    messages = [
        pb.ResultMessage(header=header),
        pb.ResultMessage(chunk=pb.Chunk(offset=0, data=payload)),
    ]
    assert stubs["honest"].PushResult(iter(messages), timeout=30).accepted

    cert, _, _ = pki.client("compromised")
    revoke_certificate(ca_dir, cert=cert)
    shutil.copy(ca_dir / "crl.pem", deployed)
    refused = _refusal(stubs["compromised"].Heartbeat, pb.HeartbeatRequest())
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED

    # The round does not wait 300 s for a participant that can no longer answer.
    summary = coordinator.summary(timeout=60)
    assert summary.completed
    assert summary.last_record.clients_accepted == 1
    assert "revoked" in summary.last_record.rejected["compromised"]


def test_an_unverifiable_revocation_list_stops_the_coordinator_from_starting(
    pki: Any, start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    from fedlink.common.errors import PKIError

    init_ca(tmp_path / "other-ca")
    foreign = revoke_certificate(tmp_path / "other-ca", serial=7).crl
    with pytest.raises(PKIError, match="invalid signature"):
        _waiting(start_coordinator, small_state, revocation_list=foreign)


# --- validity --------------------------------------------------------------------------------


def test_a_certificate_that_expires_during_a_connection_is_refused_on_its_next_call(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = _waiting(start_coordinator, small_state)
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = _timed_certificate(
        pki, "short-lived", now - dt.timedelta(minutes=1), now + dt.timedelta(seconds=2)
    )
    stub = _stub(coordinator.address, _credentials(cert, key, pki.ca_pem.read_bytes()))
    _, session = _join(stub)
    expired = now + dt.timedelta(seconds=2.5)
    time.sleep(max(0.0, (expired - dt.datetime.now(dt.timezone.utc)).total_seconds()))

    # The TLS handshake checked the dates when the connection opened; the coordinator checks
    # them again on every call made over it.
    refused = _refusal(stub.Heartbeat, pb.HeartbeatRequest(), metadata=session)
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the client certificate of 'short-lived' expired on" in (refused.details() or "")
    assert "fedlink certs issue" in (refused.details() or "")


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_the_tls_handshake_refuses_a_certificate_outside_its_validity_period(
    pki: Any, start_coordinator: Any, small_state: StateDict, when: str
) -> None:
    coordinator = _waiting(start_coordinator, small_state)
    now = dt.datetime.now(dt.timezone.utc)
    day = dt.timedelta(days=1)
    start, end = (now - 2 * day, now - day) if when == "expired" else (now + day, now + 2 * day)
    cert, key = _timed_certificate(pki, when, start, end)
    stub = _stub(coordinator.address, _credentials(cert, key, pki.ca_pem.read_bytes()))
    # BoringSSL refuses it during the handshake (gRPC logs "certificate has expired" / "is not
    # yet valid"); the client only sees the connection fail, hence its own check below.
    assert _refusal(stub.Join, pb.JoinRequest()).code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("when", ["expired", "not-yet-valid"])
def test_a_client_process_with_such_a_certificate_says_so_before_connecting(
    pki: Any, tmp_path: Path, when: str
) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    day = dt.timedelta(days=1)
    start, end = (now - 2 * day, now - day) if when == "expired" else (now + day, now + 2 * day)
    cert, key = _timed_certificate(pki, when, start, end)
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "c.key").write_bytes(key)
    (tmp_path / "c.key").chmod(0o600)
    log = tmp_path / "client.log"
    process = fedlink_process(
        [
            "client",
            "--server",
            "127.0.0.1:9",  # nothing listens: the client must stop before dialling
            "--cert",
            str(tmp_path / "c.pem"),
            "--key",
            str(tmp_path / "c.key"),
            "--ca",
            str(pki.ca_pem),
        ],
        log,
    )
    assert process.wait(timeout=120) == 2
    output = log.read_text()
    expected = "expired on" if when == "expired" else "is not valid until"
    assert f"certificate {tmp_path / 'c.pem'} {expected}" in output


# --- one session per identity ----------------------------------------------------------------


def test_a_second_join_supersedes_the_first_session_and_the_identity_counts_once(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = start_coordinator(
        small_state, num_rounds=1, min_clients=2, min_fit_clients=2, evaluate_every=0
    )
    first = coordinator.stub(pki, "twin")
    second = coordinator.stub(pki, "twin")  # the same certificate, another process
    other = coordinator.stub(pki, "other")
    _, old = _join(first)
    _, new = _join(second)
    assert old != new
    _join(other)

    refused = _refusal(first.PullTask, pb.PullTaskRequest(), metadata=old)
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.details() or ""
    assert "this session of 'twin' was superseded" in details
    assert "stop the other process" in details
    assert _refusal(first.Heartbeat, pb.HeartbeatRequest(), metadata=old).code() == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    # Nor can the superseded process make the new one leave.
    assert _refusal(first.Leave, pb.LeaveRequest(), metadata=old).code() == (
        grpc.StatusCode.FAILED_PRECONDITION
    )

    tasks = {
        name: next(iter(stub.PullTask(pb.PullTaskRequest(), metadata=session, timeout=30))).header
        for name, stub, session in (("twin", second, new), ("other", other, ()))
    }
    assert {t.kind for t in tasks.values()} == {pb.TASK_KIND_TRAIN}
    payload = encode_state(small_state)
    info = pb.PayloadInfo(size=len(payload), blake3=payload_digest(payload), encoding="safetensors")

    def upload(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        header = pb.ResultHeader(task_id=task.task_id, round=1, num_examples=1, payload=info)
        return [
            pb.ResultMessage(header=header),
            pb.ResultMessage(chunk=pb.Chunk(offset=0, data=payload)),
        ]

    # The superseded session cannot submit for its identity, even with the live task id.
    stale = _refusal(first.PushResult, iter(upload(tasks["twin"])), metadata=old)
    assert stale.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert second.PushResult(iter(upload(tasks["twin"])), metadata=new, timeout=30).accepted
    assert other.PushResult(iter(upload(tasks["other"])), timeout=30).accepted

    record = coordinator.summary().last_record
    assert (record.clients_sampled, record.clients_accepted) == (2, 2)


def test_a_superseded_session_waiting_in_a_long_poll_is_refused_at_once(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = _waiting(start_coordinator, small_state)
    first = coordinator.stub(pki, "twin")
    _, old = _join(first)
    poll = first.PullTask(pb.PullTaskRequest(), metadata=old, timeout=50)
    time.sleep(1.0)  # the poll waits: no round has started
    started = time.monotonic()
    _join(coordinator.stub(pki, "twin"))  # the same certificate joins again
    with pytest.raises(grpc.RpcError) as refused:
        next(iter(poll))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "was superseded" in (refused.value.details() or "")
    assert time.monotonic() - started < 10  # not at the end of its 60 s poll


def test_a_call_before_join_or_after_a_restart_is_told_to_join(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = _waiting(start_coordinator, small_state)
    refused = _refusal(coordinator.stub(pki, "newcomer").Heartbeat, pb.HeartbeatRequest())
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.details() == "unknown client: call Join first"


# --- resource limits -------------------------------------------------------------------------


def test_a_message_over_the_size_limit_is_refused_before_it_is_buffered(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = _waiting(start_coordinator, small_state, chunk_size=64 << 10)
    stub = coordinator.stub(pki, "bulky")
    _join(stub)
    # gRPC's receive limit is chunk_size + 64 KiB of framing; this message is 8 MiB.
    huge = pb.ResultMessage(chunk=pb.Chunk(offset=0, data=bytes(8 << 20)))
    refused = _refusal(stub.PushResult, iter([huge]))
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (refused.details() or "")


def test_a_client_over_its_request_rate_gets_resource_exhausted(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    # A refill of one call per 1000 s: the bucket's 3 calls are all this client gets here.
    coordinator = _waiting(
        start_coordinator, small_state, rate_limit_per_second=0.001, rate_limit_burst=3
    )
    stub = coordinator.stub(pki, "chatty")
    _, session = _join(stub)
    for _ in range(2):
        stub.Heartbeat(pb.HeartbeatRequest(), metadata=session, timeout=10)
    refused = _refusal(stub.Heartbeat, pb.HeartbeatRequest(), metadata=session)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'chatty' exceeded its request rate (0.001 calls/s, bursts of 3)" in (
        refused.details() or ""
    )
    # Other clients have their own buckets.
    _join(coordinator.stub(pki, "quiet"))


def test_a_client_over_its_concurrent_calls_gets_resource_exhausted_until_one_ends(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = _waiting(start_coordinator, small_state, max_calls_per_client=2)
    stub = coordinator.stub(pki, "greedy")
    _join(stub)
    # Two long polls (no round is running, so each waits for work) hold both slots.
    polls = [stub.PullTask(pb.PullTaskRequest(), timeout=60) for _ in range(2)]
    deadline = time.monotonic() + 10
    while True:
        try:
            stub.Heartbeat(pb.HeartbeatRequest(), timeout=10)
        except grpc.RpcError as exc:
            refused = exc
            break
        assert time.monotonic() < deadline, "the two polls never held both call slots"
        time.sleep(0.05)
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "'greedy' already has 2 calls in progress" in (refused.details() or "")

    for poll in polls:
        poll.cancel()
    deadline = time.monotonic() + 10
    while True:  # the slots come back as soon as gRPC has ended the cancelled calls
        try:
            stub.Heartbeat(pb.HeartbeatRequest(), timeout=10)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "cancelled calls kept their slots"
            time.sleep(0.05)


def _long_poll(stub: pb_grpc.FederationStub) -> Any:
    """A PullTask that is still waiting for work (no round runs), retried while the cap is
    still counting a call that has just finished."""
    deadline = time.monotonic() + 10
    while True:
        poll = stub.PullTask(pb.PullTaskRequest(), timeout=60)
        time.sleep(0.1)
        if not poll.done():
            return poll
        assert time.monotonic() < deadline, "a long poll could not start"


def test_calls_beyond_the_coordinators_concurrency_cap_get_resource_exhausted(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = _waiting(start_coordinator, small_state, max_concurrent_rpcs=2)
    holders = [coordinator.stub(pki, f"holder-{i}") for i in range(2)]
    for stub in holders:
        _join(stub)
    polls = [_long_poll(stub) for stub in holders]
    refused = _refusal(coordinator.stub(pki, "late").Join, pb.JoinRequest())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "Concurrent RPC limit exceeded" in (refused.details() or "")
    for poll in polls:
        poll.cancel()


# --- identity edges: certificates the federation CA signed that fedlink would never issue ----

# Each makes (certificate chain sent by the client, its key) from the federation CA; the TLS
# handshake accepts every one of them, so only the coordinator's per-call check stands between
# them and an identity of their choosing.
_HOSTILE: dict[str, tuple[Callable[[Signer], tuple[bytes, bytes]], str]] = {
    "leaf-of-an-intermediate": (
        lambda ca: _chain(forge(ca, "intermediate", ca=True), "hospital-a"),
        "was not issued by the federation CA itself",
    ),
    "leaf-of-a-ca-true-client": (
        lambda ca: _chain(forge(ca, "site-b", ca=True), "hospital-a"),
        "was not issued by the federation CA itself",
    ),
    "ca-true-client": (
        lambda ca: _pair(forge(ca, "hospital-a", ca=True)),
        "is a CA certificate (CA:TRUE)",
    ),
    "newline-in-name": (
        lambda ca: _pair(forge(ca, "hospital-a\n2026-12-04 13:00:00 INFO forged: line")),
        "which is not a fedlink name",
    ),
    "ecdsa-sha1": (lambda ca: _pair(forge_sha1(ca, "hospital-a")), "is signed with SHA1"),
    "rsa-1024": (
        lambda ca: _pair(forge(ca, "hospital-a", key=rsa.generate_private_key(65537, 1024))),
        "holds a 1024-bit RSA key",
    ),
    "no-client-auth-usage": (
        lambda ca: _pair(forge(ca, "hospital-a", eku=False)),
        "no client-auth extended key usage",
    ),
}


def _pair(leaf: Forged) -> tuple[bytes, bytes]:
    return leaf.cert_pem, leaf.key_pem


def _chain(issuer: Forged, name: str) -> tuple[bytes, bytes]:
    leaf = forge(issuer.as_signer(), name)
    return leaf.cert_pem + issuer.cert_pem, leaf.key_pem


@pytest.mark.parametrize("kind", sorted(_HOSTILE))
def test_a_certificate_fedlink_would_not_issue_is_refused_on_every_call(
    pki: Any,
    start_coordinator: Any,
    small_state: StateDict,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    coordinator = _waiting(start_coordinator, small_state)
    make, reason = _HOSTILE[kind]
    cert, key = make(Signer.load(pki.ca_dir))
    stub = _stub(coordinator.address, _credentials(cert, key, pki.ca_pem.read_bytes()))
    with caplog.at_level(logging.WARNING, logger="fedlink"):
        refused = _refusal(stub.Join, pb.JoinRequest())
        # UNAUTHENTICATED, not UNAVAILABLE: the handshake let it through, the coordinator did not.
        assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason in (refused.details() or "")
        assert "fedlink certs issue" in (refused.details() or "")
        assert _refusal(stub.Heartbeat, pb.HeartbeatRequest()).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert _refusal(stub.PullTask, pb.PullTaskRequest()).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals and all("\n" not in message for message in refusals)


def test_a_leaf_of_a_revoked_intermediate_stays_refused(
    pki: Any, start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    shutil.copytree(pki.ca_dir, ca_dir)
    intermediate = forge(Signer.load(ca_dir), "intermediate", ca=True)
    revoke_certificate(ca_dir, serial=intermediate.cert.serial_number)
    coordinator = _waiting(start_coordinator, small_state, revocation_list=ca_dir / "crl.pem")
    cert, key = _chain(intermediate, "hospital-a")
    stub = _stub(coordinator.address, _credentials(cert, key, pki.ca_pem.read_bytes()))
    refused = _refusal(stub.Join, pb.JoinRequest())
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no intermediates" in (refused.details() or "")


def test_an_expiring_ca_ends_the_authorisation_of_open_connections(
    start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    # A CA a few seconds from its end; its certificates end with it.
    ca_dir = tmp_path / "short-ca"
    ca_dir.mkdir()
    not_after = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) + dt.timedelta(seconds=4)
    ca = self_signed_ca("short-lived federation CA", not_after)
    ca.write(ca_dir, "ca")
    server = issue_certificate(
        ca_dir, tmp_path / "srv", "server", role="server", hosts=["127.0.0.1"]
    )
    client = issue_certificate(ca_dir, tmp_path / "cli", "site-a", role="client")
    coordinator = _waiting(
        start_coordinator, small_state, cert=server.cert, key=server.key, ca=server.ca
    )
    stub = _stub(
        coordinator.address,
        _credentials(client.cert.read_bytes(), client.key.read_bytes(), ca.cert_pem),
    )
    _, session = _join(stub)
    time.sleep((not_after - dt.datetime.now(dt.timezone.utc)).total_seconds() + 1.2)

    refused = _refusal(stub.Heartbeat, pb.HeartbeatRequest(), metadata=session)
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "the federation CA is valid from" in (refused.details() or "")
    assert "fedlink certs init --force" in (refused.details() or "")


def test_a_rolled_back_revocation_list_stops_a_restarted_coordinator(
    pki: Any, start_coordinator: Any, small_state: StateDict, tmp_path: Path
) -> None:
    from fedlink.common.errors import PKIError

    ca_dir = tmp_path / "ca"
    shutil.copytree(pki.ca_dir, ca_dir)
    revoke_certificate(ca_dir, serial=1)
    older = tmp_path / "crl-1.pem"
    shutil.copy(ca_dir / "crl.pem", older)
    cert, _, _ = pki.client("rolled-back")
    revoke_certificate(ca_dir, cert=cert)
    deployed = tmp_path / "deployed-crl.pem"
    shutil.copy(ca_dir / "crl.pem", deployed)
    state = tmp_path / "state"

    first = _waiting(start_coordinator, small_state, revocation_list=deployed, state_dir=state)
    refused = _refusal(first.stub(pki, "rolled-back").Join, pb.JoinRequest())
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED
    first.stop.set()
    first.engine.request_stop()
    first.thread.join(10)
    first.server.stop(0).wait()

    # Someone puts back the list from before "rolled-back" was revoked, and restarts.
    shutil.copy(older, deployed)
    with pytest.raises(PKIError, match="has CRL number 1, older than number 2"):
        _waiting(start_coordinator, small_state, revocation_list=deployed, state_dir=state)
    shutil.copy(ca_dir / "crl.pem", deployed)
    second = _waiting(start_coordinator, small_state, revocation_list=deployed, state_dir=state)
    refused = _refusal(second.stub(pki, "rolled-back").Join, pb.JoinRequest())
    assert refused.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_certs_cli_refuses_a_forging_name_and_an_over_long_serial_in_one_line(
    pki: Any, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    shutil.copytree(pki.ca_dir, ca_dir)
    runs = {
        "issue": [
            *("certs", "issue", "--ca-dir", str(ca_dir), "--out", str(tmp_path / "out")),
            *("--client", "--name", "site-a\n2026-12-04 INFO forged"),
        ],
        "revoke": ["certs", "revoke", "--ca-dir", str(ca_dir), "--serial", "ff" * 64],
    }
    for name, arguments in runs.items():
        log = tmp_path / f"{name}.log"
        assert fedlink_process(arguments, log).wait(timeout=60) == 2
        output = log.read_text()
        assert output.count("\n") == 1 and "Traceback" not in output, output
        assert output.startswith(f"fedlink certs {name}: error: ")
    assert not (tmp_path / "out").exists()
    assert not (ca_dir / "crl.pem").exists()
