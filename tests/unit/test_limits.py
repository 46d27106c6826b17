"""Tests for the per-client request rate (token bucket) and calls-in-progress limit."""

from __future__ import annotations

import pytest

from fedlink.common.errors import AccessDenied
from fedlink.server.limits import ClientLimits


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _refused(limits: ClientLimits, identity: str) -> AccessDenied:
    with pytest.raises(AccessDenied) as refused:
        limits.admit(identity)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    return refused.value


def test_a_burst_is_admitted_then_the_rate_applies() -> None:
    clock = FakeClock()
    limits = ClientLimits(rate=2.0, burst=3, max_calls=100, clock=clock)
    for _ in range(3):
        limits.admit("a").release()
    refused = _refused(limits, "a")
    assert "'a' exceeded its request rate (2 calls/s, bursts of 3); retry in 0.50s" in str(refused)
    clock.now += 0.5  # one token back
    limits.admit("a").release()
    _refused(limits, "a")
    clock.now += 1000  # never more than the burst
    for _ in range(3):
        limits.admit("a").release()
    _refused(limits, "a")


def test_each_identity_has_its_own_bucket() -> None:
    limits = ClientLimits(rate=1.0, burst=1, max_calls=10, clock=FakeClock())
    limits.admit("a").release()
    _refused(limits, "a")
    limits.admit("b").release()


def test_calls_in_progress_are_capped_and_freed_once_per_release() -> None:
    limits = ClientLimits(rate=1000.0, burst=1000, max_calls=2, clock=FakeClock())
    first = limits.admit("a")
    limits.admit("a")
    refused = _refused(limits, "a")
    assert "'a' already has 2 calls in progress" in str(refused)
    first.release()
    first.release()  # the handler's finally and gRPC's callback may both release
    limits.admit("a")
    _refused(limits, "a")


def test_a_refused_call_costs_no_token() -> None:
    limits = ClientLimits(rate=1.0, burst=2, max_calls=1, clock=FakeClock())
    slot = limits.admit("a")
    _refused(limits, "a")  # over the calls limit
    slot.release()
    limits.admit("a").release()  # the second token is still there


def test_calls_in_progress_are_capped_in_total_across_identities() -> None:
    limits = ClientLimits(
        rate=1000.0,
        burst=1000,
        max_calls=2,
        max_total_calls=3,
        settings=("max_health_watches_per_client", "max_health_watches"),
    )
    slots = [limits.admit("a"), limits.admit("a"), limits.admit("b")]
    assert "(max_health_watches_per_client)" in str(_refused(limits, "a"))
    assert "(max_health_watches)" in str(_refused(limits, "c"))
    slots[0].release()
    slots[0].release()  # idempotent: frees one slot, not two
    slots.append(limits.admit("c"))
    _refused(limits, "d")
