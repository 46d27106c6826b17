"""Dialling the coordinator: a mutually-authenticated channel and retry with backoff."""

from __future__ import annotations

import logging
import random
import socket
import ssl
import time

import grpc
from cryptography import x509

from fedlink.client.config import ClientConfig
from fedlink.common.pki import Credentials, load_credentials
from fedlink.common.wire import MAX_CHUNK_SIZE, MESSAGE_OVERHEAD

log = logging.getLogger(__name__)

# Failures that mean "the coordinator cannot serve us right now": retry with backoff.
# RESOURCE_EXHAUSTED is the coordinator's rate or concurrency limit telling us to slow down.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def open_channel(config: ClientConfig, creds: Credentials | None = None) -> grpc.Channel:
    """The channel to the coordinator; `creds` are the client's already loaded credentials
    (loaded from the config when not given)."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_receive_message_length", MAX_CHUNK_SIZE + MESSAGE_OVERHEAD),
        ("grpc.max_send_message_length", MAX_CHUNK_SIZE + MESSAGE_OVERHEAD),
        # Pings keep NATs and load balancers (some cut idle flows after ~4 min) from dropping us.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if config.insecure:
        log.warning(
            "INSECURE MODE: no TLS; the coordinator is not authenticated and the model travels "
            "in plaintext. Use this for local development only."
        )
        return grpc.insecure_channel(config.server, options=options)
    creds = creds or client_credentials(config)
    assert creds is not None
    if config.server_name:
        options.append(("grpc.ssl_target_name_override", config.server_name))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem, private_key=creds.key_pem, certificate_chain=creds.cert_pem
    )
    return grpc.secure_channel(config.server, credentials, options=options)


# An OpenSSL verify code: the certificate does not name the host (X509_V_ERR_HOSTNAME_MISMATCH,
# X509_V_ERR_IP_ADDRESS_MISMATCH); any other verify failure is a chain the bundle does not trust.
_NAME_MISMATCH_CODES = frozenset({62, 64})
# Verify codes meaning the chain does not lead to the bundle's CA (unable to get the issuer,
# locally or at all; self-signed; a signature that does not verify).
_OTHER_CA_CODES = frozenset({2, 7, 18, 19, 20, 21})


def trust_problem(config: ClientConfig, timeout: float = 5.0) -> str | None:
    """Why this client cannot trust the coordinator's certificate, or None if it can (or if the
    coordinator cannot be reached at all: that is a network problem, retried elsewhere).

    gRPC reports a failed TLS handshake as UNAVAILABLE, like a network outage, with OpenSSL's
    text in a debug string. So the coordinator's certificate is checked again here with Python's
    `ssl` against the same CA bundle and name, which tells the two causes apart precisely.
    """
    if config.insecure or config.ca is None:
        return None
    host, _, port = config.server.rpartition(":")
    host = host.strip("[]")
    name = config.server_name or host
    context = ssl.create_default_context(cafile=str(config.ca))
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=name),
        ):
            return None
    except ssl.SSLCertVerificationError as exc:
        issuer, names = _presented_certificate(host, int(port), name, timeout)
        if exc.verify_code in _NAME_MISMATCH_CODES:
            return (
                f"the coordinator's certificate is not valid for the name {name!r} (it names "
                f"{names or 'no host'}); connect with --server using one of those names, or set "
                "--server-name to the name in the coordinator's certificate"
            )
        issuer = issuer or "an unknown issuer"
        if exc.verify_code not in _OTHER_CA_CODES:  # e.g. expired, not yet valid
            return (
                f"the coordinator's certificate (issued by {issuer}) cannot be trusted: "
                f"{exc.verify_message}; ask the coordinator's operator to issue a valid one "
                "(`fedlink certs issue --server`), and check this machine's clock"
            )
        return (
            f"the coordinator's certificate (issued by {issuer}) is not "
            f"signed by the CA in {config.ca} ({_subject_of(config.ca)}): "
            f"{exc.verify_message}; use the federation's CA certificate (ca.pem from the "
            "coordinator's `fedlink certs init`) as --ca, or check that --server points at "
            "this federation's coordinator"
        )
    except (OSError, ValueError):
        return None  # unreachable or not TLS at all: the caller's retry handles it


def _presented_certificate(host: str, port: int, name: str, timeout: float) -> tuple[str, str]:
    """The issuer and host names of the certificate the coordinator presents, read without
    verifying it (only to say what is wrong with it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        cert = x509.load_der_x509_certificate(der)
        issuer = cert.issuer.rfc4514_string()
        try:
            alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(n) for n in alt.get_values_for_type(x509.DNSName)]
            names += [str(a) for a in alt.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            names = []
        return issuer, ", ".join(repr(n) for n in names)
    except (OSError, ValueError, AssertionError):
        return "", ""


def _subject_of(ca: object) -> str:
    try:
        with open(str(ca), "rb") as pem:
            return x509.load_pem_x509_certificate(pem.read()).subject.rfc4514_string()
    except (OSError, ValueError):
        return "unreadable"


def client_credentials(config: ClientConfig) -> Credentials | None:
    """This client's certificate, key and CA, checked (None in --insecure mode)."""
    if config.insecure:
        return None
    assert config.cert and config.key and config.ca
    return load_credentials(config.cert, config.key, config.ca, role="client")


class Backoff:
    """Exponential backoff with full jitter, so restarted clients do not reconnect in lockstep."""

    def __init__(
        self, *, initial: float = 0.5, maximum: float = 30.0, give_up_after: float
    ) -> None:
        self._initial = initial
        self._maximum = maximum
        self._give_up_after = give_up_after
        self._attempt = 0
        self._failing_since: float | None = None

    def reset(self) -> None:
        self._attempt = 0
        self._failing_since = None

    def wait(self, reason: str) -> bool:
        """Sleep before the next attempt; False once the coordinator was gone too long."""
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since > self._give_up_after:
            return False
        delay = random.uniform(0, min(self._maximum, self._initial * 2**self._attempt))
        self._attempt += 1
        log.info("coordinator unreachable (%s); retrying in %.1fs", reason, delay)
        time.sleep(delay)
        return True
