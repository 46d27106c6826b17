"""Tests for the fixed-point ring encoding: no wrap-around, the documented error bound, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlink.common.fixedpoint import FixedPoint, UpdateLayout, encode_weighted_update
from fedlink.common.tensors import manifest_of


@pytest.mark.parametrize(
    ("ring_bits", "n", "bound"),
    [(64, 5, 1.0), (64, 20, 100.0), (64, 1000, 3.0), (32, 10, 1.0), (32, 20, 100.0)],
)
def test_finest_encoding_whose_worst_case_sum_cannot_wrap(
    ring_bits: int, n: int, bound: float
) -> None:
    encoding = FixedPoint.for_sum(num_clients=n, value_bound=bound, ring_bits=ring_bits)
    limit = 2.0 ** (ring_bits - 1)
    assert n * (bound * 2.0**encoding.frac_bits + 0.5) < limit
    assert bound * 2.0**encoding.frac_bits <= 2.0**52
    finer = encoding.frac_bits + 1  # one more fractional bit would break one of the two
    assert n * (bound * 2.0**finer + 0.5) >= limit or bound * 2.0**finer > 2.0**52
    # n clients all at +bound, and all at -bound, sum (mod 2^k) and decode without wrapping.
    for sign in (1.0, -1.0):
        values = np.full(3, sign * bound)
        total = np.zeros(3, dtype=encoding.dtype)
        for _ in range(n):
            total += encoding.encode(values)
        assert np.abs(encoding.decode(total) - n * sign * bound).max() <= encoding.sum_error_bound(
            n
        )


def test_decoded_sum_of_random_values_is_within_the_documented_bound() -> None:
    rng = np.random.default_rng(0)
    n = 20
    encoding = FixedPoint.for_sum(num_clients=n, value_bound=4.0, ring_bits=32)
    values = rng.uniform(-4.0, 4.0, size=(n, 10_000))
    total = np.zeros(10_000, dtype=encoding.dtype)
    for row in values:
        total += encoding.encode(row)
    error = np.abs(encoding.decode(total) - values.sum(axis=0)).max()
    assert error <= encoding.sum_error_bound(n)
    assert error > encoding.sum_error_bound(n) / 100  # the bound is not vacuous


def test_values_outside_the_bound_or_not_finite_are_refused() -> None:
    encoding = FixedPoint.for_sum(num_clients=3, value_bound=2.0)
    with pytest.raises(ValueError, match=r"magnitude 2\.5 exceeds the secure-aggregation bound 2"):
        encoding.encode(np.array([0.0, -2.5]))
    with pytest.raises(ValueError, match="non-finite"):
        encoding.encode(np.array([np.nan]))


def test_too_narrow_a_ring_is_refused_with_advice() -> None:
    with pytest.raises(ValueError, match="use ring_bits=64"):
        FixedPoint.for_sum(num_clients=1000, value_bound=1e7, ring_bits=32)
    with pytest.raises(ValueError, match="ring_bits must be one of"):
        FixedPoint.for_sum(num_clients=3, value_bound=1.0, ring_bits=16)


def test_layout_flattens_floating_tensors_and_a_weight_slot_and_averages_back() -> None:
    state = {
        "a": torch.tensor([[1.0, -2.0]], dtype=torch.float32),
        "count": torch.tensor(4),
        "b": torch.tensor([0.5], dtype=torch.float64),
    }
    layout = UpdateLayout(manifest_of(state))
    assert layout.length == 4
    flat = layout.flatten(state, 0.25)
    assert flat.tolist() == [0.25, -0.5, 0.125, 0.25]
    average = layout.average(flat * 3)
    assert set(average) == {"a", "b"}
    assert torch.equal(average["a"], state["a"]) and torch.equal(average["b"], state["b"])
    assert average["b"].dtype == torch.float64


def test_weights_above_the_cap_are_refused() -> None:
    state = {"a": torch.zeros(2)}
    layout = UpdateLayout(manifest_of(state))
    encoding = FixedPoint.for_sum(num_clients=2, value_bound=1.0)
    with pytest.raises(ValueError, match=r"weight must be in \(0, 100.0\]"):
        encode_weighted_update(state, 101.0, max_weight=100.0, layout=layout, encoding=encoding)
