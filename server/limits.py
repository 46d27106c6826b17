"""Per-client resource limits: a request rate (token bucket) and a number of calls in progress.

The coordinator-wide cap on calls in progress is gRPC's own `maximum_concurrent_rpcs` (set in
`app.py`); these per-identity limits keep one client from using all of it. State is a few numbers
per identity, and identities are bounded by the certificates the federation CA issued.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedlink.common.errors import AccessDenied


@dataclass
class _Client:
    tokens: float
    updated: float
    calls: int = 0


class CallSlot:
    """One admitted call; `release()` when it ends (idempotent, so both the handler's `finally`
    and gRPC's termination callback may call it)."""

    def __init__(self, limits: ClientLimits, identity: str) -> None:
        self._limits = limits
        self._identity = identity
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._limits._release(self._identity)


class ClientLimits:
    """A token bucket (`rate` calls per second on average, bursts of `burst`) and at most
    `max_calls` calls in progress, per identity; optionally `max_total_calls` in all."""

    def __init__(
        self,
        *,
        rate: float,
        burst: int,
        max_calls: int,
        max_total_calls: int | None = None,
        settings: tuple[str, str] = ("max_calls_per_client", ""),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._max_calls = max_calls
        self._max_total_calls = max_total_calls
        self._total_calls = 0
        # The config keys named in refusals: (per identity, in total).
        self._settings = settings
        self._clock = clock
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()

    def admit(self, identity: str) -> CallSlot:
        """Take a token and a call slot, or raise AccessDenied(RESOURCE_EXHAUSTED)."""
        now = self._clock()
        with self._lock:
            client = self._clients.get(identity)
            if client is None:
                client = self._clients[identity] = _Client(tokens=self._burst, updated=now)
            client.tokens = min(self._burst, client.tokens + (now - client.updated) * self._rate)
            client.updated = now
            if client.tokens < 1.0:
                wait = (1.0 - client.tokens) / self._rate
                raise AccessDenied(
                    "RESOURCE_EXHAUSTED",
                    f"client {identity!r} exceeded its request rate ({self._rate:g} calls/s, "
                    f"bursts of {self._burst:g}); retry in {wait:.2f}s",
                )
            if client.calls >= self._max_calls:
                raise AccessDenied(
                    "RESOURCE_EXHAUSTED",
                    f"client {identity!r} already has {client.calls} calls in progress, the "
                    f"limit ({self._settings[0]}); finish or cancel one first",
                )
            if self._max_total_calls is not None and self._total_calls >= self._max_total_calls:
                raise AccessDenied(
                    "RESOURCE_EXHAUSTED",
                    f"the coordinator already serves {self._total_calls} such calls, the limit "
                    f"({self._settings[1]}); retry later",
                )
            client.tokens -= 1.0
            client.calls += 1
            self._total_calls += 1
        return CallSlot(self, identity)

    def _release(self, identity: str) -> None:
        with self._lock:
            self._clients[identity].calls -= 1
            self._total_calls -= 1
