"""Tests for streaming FedAvg: the weighted mean, dtype handling, integer counters, and the
bounds that keep the aggregate finite."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedlink.common.errors import UpdateRejected
from fedlink.common.tensors import StateDict, TensorSpec, manifest_of
from fedlink.server.aggregation import StreamingFedAvg
from fedlink.server.validation import check_update_bound, model_norm, non_finite_tensors


def _update(seed: int) -> StateDict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(4, 3, 3, generator=generator),
        "conv.bias": torch.randn(4, generator=generator),
        "bn.running_mean": torch.randn(4, generator=generator, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(seed * 10, dtype=torch.int64),
    }


def _zeros(state: StateDict) -> StateDict:
    return {name: torch.zeros_like(tensor) for name, tensor in state.items()}


def _aggregate(
    updates: list[tuple[StateDict, float]], global_state: StateDict | None = None
) -> StateDict:
    """FedAvg of `updates` over a global model (default: all zeros, so counters start at 0)."""
    first = updates[0][0]
    aggregator = StreamingFedAvg(manifest_of(first), global_state or _zeros(first))
    for state, weight in updates:
        aggregator.add(state, weight)
    return aggregator.result()


def test_weighted_average_matches_fedavg_formula_for_three_clients() -> None:
    updates = [(_update(1), 10.0), (_update(2), 30.0), (_update(3), 60.0)]
    result = _aggregate(updates)
    total = sum(weight for _, weight in updates)
    for name in ("conv.weight", "conv.bias", "bn.running_mean"):
        expected = sum(state[name] * weight for state, weight in updates) / total
        assert isinstance(expected, torch.Tensor)
        assert torch.allclose(result[name], expected, rtol=1e-6, atol=1e-7), name
    # The weights matter: the unweighted mean is different.
    unweighted = sum(state["conv.weight"] for state, _ in updates) / 3
    assert isinstance(unweighted, torch.Tensor)
    assert not torch.allclose(result["conv.weight"], unweighted, atol=1e-3)


@pytest.mark.parametrize("reuse", [False, True], ids=["new-memory", "reused-memory"])
def test_the_average_has_the_bits_of_a_plain_pytorch_loop(reuse: bool) -> None:
    generator = torch.Generator().manual_seed(5)
    updates = []
    for weight in (3.0, 117.0, 0.3):
        values = torch.randn(10_000, generator=generator) * 1e3
        values[::7] = -0.0  # the sign of a zero sum is where shortcuts differ
        values[::11] = 1e-40  # subnormals
        updates.append(({"w": values}, weight))
    plain = torch.zeros(10_000)
    for state, weight in updates:
        plain.add_(state["w"], alpha=weight)
    plain /= sum(weight for _, weight in updates)
    spare = {"w": torch.full((10_000,), float("nan"))} if reuse else None  # old memory
    aggregator = StreamingFedAvg(manifest_of(updates[0][0]), {}, reuse=spare)
    for state, weight in updates:
        aggregator.add(state, weight)
    result = aggregator.result()["w"]
    assert torch.equal(result.view(torch.int32), plain.view(torch.int32))


def test_single_update_is_returned_unchanged() -> None:
    update = _update(5)
    result = _aggregate([(update, 7.0)])
    for name, tensor in update.items():
        assert torch.allclose(result[name], tensor), name


def test_equal_updates_average_to_themselves_regardless_of_weights() -> None:
    update = _update(4)
    result = _aggregate([(update, 1.0), (update, 1000.0), (update, 3.0)])
    assert torch.allclose(result["conv.weight"], update["conv.weight"], atol=1e-6)


def test_counters_and_totals_track_what_was_added() -> None:
    aggregator = StreamingFedAvg(manifest_of(_update(0)), _update(0))
    aggregator.add(_update(1), 2.0)
    aggregator.add(_update(2), 3.5)
    assert aggregator.num_updates == 2
    assert aggregator.total_weight == 5.5


def test_result_dtypes_and_shapes_equal_the_manifest() -> None:
    state = {
        "f32": torch.ones(2, 3),
        "f16": torch.ones(4, dtype=torch.float16),
        "bf16": torch.ones(2, 2, dtype=torch.bfloat16),
        "f64": torch.ones(1, dtype=torch.float64),
        "i64": torch.tensor(3),
        "i32": torch.tensor([1, 2], dtype=torch.int32),
        "u8": torch.tensor([1, 2], dtype=torch.uint8),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(1.5),
    }
    manifest = manifest_of(state)
    result = _aggregate([(state, 1.0), (state, 2.0)])
    assert manifest_of(result) == manifest


@pytest.mark.parametrize(
    ("dtype", "exact_sum_limit"), [(torch.float16, 2048), (torch.bfloat16, 256)]
)
def test_half_precision_updates_are_accumulated_in_float32(
    dtype: torch.dtype, exact_sum_limit: int
) -> None:
    # Past `exact_sum_limit`, adding 1.0 in this dtype no longer changes the sum; a half-precision
    # accumulator would stall there and return about half of the true mean of 1.0.
    state = {"w": torch.ones(8, dtype=dtype)}
    aggregator = StreamingFedAvg(manifest_of(state), state)
    for _ in range(2 * exact_sum_limit):
        aggregator.add(state, 1.0)
    result = aggregator.result()
    assert result["w"].dtype == dtype
    assert torch.equal(result["w"], torch.ones(8, dtype=dtype))


def test_many_small_float16_updates_average_accurately() -> None:
    generator = torch.Generator().manual_seed(0)
    updates = [(torch.rand(64, generator=generator) * 1e-3).to(torch.float16) for _ in range(3000)]
    weights = [float(1 + i % 7) for i in range(len(updates))]
    aggregator = StreamingFedAvg({"w": TensorSpec(torch.float16, (64,))}, {})
    for tensor, weight in zip(updates, weights, strict=True):
        aggregator.add({"w": tensor}, weight)
    result = aggregator.result()["w"]
    reference = sum(t.to(torch.float64) * w for t, w in zip(updates, weights, strict=True)) / sum(
        weights
    )
    assert isinstance(reference, torch.Tensor)
    assert result.dtype == torch.float16
    # Rounding the exact mean to float16 costs at most 2**-11 relative; a float16 accumulator
    # would be off by about 8% on these inputs.
    relative_error = ((result.to(torch.float64) - reference).abs() / reference).max()
    assert relative_error < 1e-3


def test_float64_parameters_keep_float64_precision() -> None:
    a = {"w": torch.tensor([1.0 + 2e-12], dtype=torch.float64)}
    b = {"w": torch.tensor([1.0 + 4e-12], dtype=torch.float64)}
    result = _aggregate([(a, 1.0), (b, 1.0)])
    assert result["w"].dtype == torch.float64
    assert abs(result["w"].item() - (1.0 + 3e-12)) < 1e-15


def test_integer_tensors_take_the_median_with_the_global_value_without_float_rounding() -> None:
    big = 2**60 + 1  # not representable in float64: any detour through float would change it
    global_state = {"counts": torch.tensor([big, 0, 0], dtype=torch.int64)}
    a = {"counts": torch.tensor([big + 1, 5, -3], dtype=torch.int64)}
    b = {"counts": torch.tensor([7, big + 2, -9], dtype=torch.int64)}
    result = _aggregate([(a, 1.0), (b, 100.0)], global_state)
    assert result["counts"].dtype == torch.int64
    assert result["counts"].tolist() == [big, 5, -3]


def test_batchnorm_counter_is_the_median_not_the_weighted_mean_or_the_maximum() -> None:
    # Votes 0 (global), 10, 20, 30: the upper of the two middle values.
    updates = [(_update(1), 1.0), (_update(2), 1.0), (_update(3), 100.0)]
    result = _aggregate(updates)
    assert result["bn.num_batches_tracked"].dtype == torch.int64
    assert int(result["bn.num_batches_tracked"]) == 20


@pytest.mark.parametrize("forged", [2**63 - 1, -(2**63)])
def test_one_client_cannot_push_a_counter_past_the_global_and_honest_values(forged: int) -> None:
    global_state = _update(0)
    global_state["bn.num_batches_tracked"] = torch.tensor(100)
    honest, attacker = _update(1), _update(2)
    honest["bn.num_batches_tracked"] = torch.tensor(110)
    attacker["bn.num_batches_tracked"] = torch.tensor(forged)
    result = _aggregate([(honest, 1.0), (attacker, 1000.0)], global_state)
    assert int(result["bn.num_batches_tracked"]) in (100, 110)


def test_bool_and_uint8_tensors_take_the_median_with_the_global_value() -> None:
    global_state = {
        "mask": torch.tensor([False, False, False]),
        "u8": torch.tensor([0, 0], dtype=torch.uint8),
    }
    a = {
        "mask": torch.tensor([True, False, True]),
        "u8": torch.tensor([1, 200], dtype=torch.uint8),
    }
    b = {
        "mask": torch.tensor([False, False, True]),
        "u8": torch.tensor([3, 100], dtype=torch.uint8),
    }
    result = _aggregate([(a, 1.0), (b, 2.0)], global_state)
    assert result["mask"].dtype == torch.bool
    assert result["mask"].tolist() == [False, False, True]  # a majority of the three votes
    assert result["u8"].dtype == torch.uint8
    assert result["u8"].tolist() == [1, 100]


def test_adding_updates_does_not_modify_the_clients_tensors() -> None:
    update = _update(1)
    snapshot = {name: tensor.clone() for name, tensor in update.items()}
    other = _update(2)
    other["bn.num_batches_tracked"] = torch.tensor(10**6)
    _aggregate([(update, 1.0), (other, 2.0)])
    for name, tensor in snapshot.items():
        assert torch.equal(update[name], tensor), name


def test_order_of_updates_does_not_change_the_result() -> None:
    updates = [(_update(seed), float(weight)) for seed, weight in [(1, 3), (2, 17), (3, 5)]]
    results = [_aggregate(list(order)) for order in itertools.permutations(updates)]
    first = results[0]
    for other in results[1:]:
        for name, tensor in first.items():
            if tensor.dtype.is_floating_point:
                assert torch.allclose(other[name], tensor, rtol=1e-6, atol=1e-7), name
            else:
                assert torch.equal(other[name], tensor), name


@pytest.mark.parametrize("weight", [0.0, -1.0, -1e-9])
def test_non_positive_weight_is_refused_and_leaves_the_aggregate_untouched(weight: float) -> None:
    aggregator = StreamingFedAvg(manifest_of(_update(0)), _update(0))
    aggregator.add(_update(1), 1.0)
    with pytest.raises(ValueError, match="weight must be positive"):
        aggregator.add(_update(2), weight)
    assert aggregator.num_updates == 1
    assert aggregator.total_weight == 1.0
    result = aggregator.result()
    assert torch.allclose(result["conv.weight"], _update(1)["conv.weight"])


def test_result_without_updates_is_refused() -> None:
    aggregator = StreamingFedAvg(manifest_of(_update(0)), _update(0))
    with pytest.raises(ValueError, match="no updates"):
        aggregator.result()


def test_the_update_bound_is_relative_to_the_global_model_and_cannot_overflow() -> None:
    global_state = {"w": torch.full((100,), 0.1), "steps": torch.tensor(0)}
    norm = model_norm(global_state)  # 1.0
    near = {"w": torch.full((100,), 0.5), "steps": torch.tensor(1)}  # 4.0 away
    check_update_bound(near, global_state, ratio=10.0, global_norm=norm)
    with pytest.raises(UpdateRejected, match="max_update_norm_ratio"):
        check_update_bound(near, global_state, ratio=2.0, global_norm=norm)
    extreme = {"w": torch.full((100,), 3.0e38), "steps": torch.tensor(1)}
    # Too far to represent in float32: Inf, which no ratio admits.
    with pytest.raises(UpdateRejected, match="inf away from the global model"):
        check_update_bound(extreme, global_state, ratio=1e30, global_norm=norm)
    assert torch.equal(global_state["w"], torch.full((100,), 0.1))  # nothing changed in place


def test_non_finite_tensors_names_the_broken_ones() -> None:
    state = {"w": torch.tensor([1.0, -3.0e38]), "steps": torch.tensor(2**62)}
    assert non_finite_tensors(state) == []
    assert non_finite_tensors({"w": torch.tensor([1.0, float("nan")])}) == ["w"]
