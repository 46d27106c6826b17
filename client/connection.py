"""Dialling the coordinator: a mutually-authenticated channel and retry with backoff."""

from __future__ import annotations

import logging
import random
import time

import grpc

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
