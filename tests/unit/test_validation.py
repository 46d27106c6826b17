"""Tests for update validation: nothing malformed or non-finite reaches aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from fedlink.common.errors import UpdateRejected
from fedlink.common.tensors import StateDict, manifest_of
from fedlink.server.aggregation import SUM_LIMIT
from fedlink.server.validation import (
    MAX_METRICS,
    check_metrics,
    check_num_examples,
    check_update,
)


def _global_state() -> StateDict:
    return {
        "fc.weight": torch.zeros(3, 4),
        "fc.bias": torch.zeros(3),
        "half.weight": torch.zeros(2, dtype=torch.float16),
        "bn.num_batches_tracked": torch.tensor(0),
    }


def _rejection(state: StateDict) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        check_update(state, manifest_of(_global_state()))
    assert info.value.code == "INVALID_ARGUMENT"
    return info.value


def test_update_matching_the_manifest_is_accepted() -> None:
    update = {name: torch.ones_like(t) for name, t in _global_state().items()}
    check_update(update, manifest_of(_global_state()))


def test_update_with_extreme_but_finite_values_is_accepted() -> None:
    update = _global_state()
    update["fc.weight"] = torch.full((3, 4), torch.finfo(torch.float32).max)
    update["half.weight"] = torch.full((2,), torch.finfo(torch.float16).min, dtype=torch.float16)
    check_update(update, manifest_of(_global_state()))


def test_missing_tensor_is_rejected_naming_it() -> None:
    update = _global_state()
    del update["fc.bias"]
    assert "missing tensor(s): 'fc.bias'" in str(_rejection(update))


def test_many_missing_tensors_are_summarised() -> None:
    manifest = manifest_of({f"layer{i}": torch.zeros(1) for i in range(8)})
    with pytest.raises(UpdateRejected, match=r"'layer0', .*'layer4' and 3 more"):
        check_update({}, manifest)


def test_unknown_tensor_is_rejected_naming_it() -> None:
    update = _global_state()
    update["backdoor.weight"] = torch.zeros(1)
    assert "unknown tensor(s): 'backdoor.weight'" in str(_rejection(update))


def test_wrong_dtype_is_rejected_naming_tensor_and_both_dtypes() -> None:
    update = _global_state()
    update["fc.weight"] = torch.zeros(3, 4, dtype=torch.float64)
    message = str(_rejection(update))
    assert "'fc.weight'" in message
    assert "torch.float64" in message
    assert "torch.float32" in message


def test_integer_counter_sent_as_float_is_rejected() -> None:
    update = _global_state()
    update["bn.num_batches_tracked"] = torch.tensor(0.0)
    assert "'bn.num_batches_tracked'" in str(_rejection(update))


def test_wrong_shape_is_rejected_naming_tensor_and_both_shapes() -> None:
    update = _global_state()
    update["fc.weight"] = torch.zeros(4, 3)
    message = str(_rejection(update))
    assert "'fc.weight'" in message
    assert "(4, 3)" in message
    assert "(3, 4)" in message


def test_same_numel_but_flattened_shape_is_rejected() -> None:
    update = _global_state()
    update["fc.weight"] = torch.zeros(12)
    assert "'fc.weight' has shape (12,)" in str(_rejection(update))


@pytest.mark.parametrize(
    "bad_value", [math.nan, math.inf, -math.inf], ids=["nan", "plus-inf", "minus-inf"]
)
@pytest.mark.parametrize("name", ["fc.weight", "half.weight"])
def test_non_finite_value_is_rejected_naming_the_tensor(name: str, bad_value: float) -> None:
    update = _global_state()
    poisoned = update[name].clone()
    poisoned.view(-1)[-1] = bad_value
    update[name] = poisoned
    message = str(_rejection(update))
    assert f"tensor {name!r} contains NaN or Inf" in message


def test_non_finite_bfloat16_is_rejected() -> None:
    manifest = manifest_of({"w": torch.zeros(2, dtype=torch.bfloat16)})
    with pytest.raises(UpdateRejected, match="'w' contains NaN or Inf"):
        check_update({"w": torch.tensor([0.0, math.nan], dtype=torch.bfloat16)}, manifest)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_one_non_finite_value_anywhere_in_a_large_tensor_is_found(
    dtype: torch.dtype, bad_value: float
) -> None:
    """The single min/max pass must see a NaN in every position a vectorized reduction
    splits the tensor into (lanes, blocks, the tail)."""
    manifest = manifest_of({"w": torch.zeros(100_003, dtype=dtype)})
    for position in (0, 1, 7, 15, 31, 63, 4095, 65_536, 100_000, 100_002):
        update = torch.zeros(100_003, dtype=dtype)
        update[position] = bad_value
        with pytest.raises(UpdateRejected, match="'w' contains NaN or Inf"):
            check_update({"w": update}, manifest)


def test_check_update_returns_what_one_update_can_add_to_a_sum() -> None:
    """The largest |value| over the floating tensors (integer counters are not summed)."""
    state = {"w": torch.tensor([1.0, -3.0e38]), "h": torch.tensor([2.0], dtype=torch.float16)}
    state["steps"] = torch.tensor(2**62)
    assert check_update(state, manifest_of(state)) == pytest.approx(3.0e38)
    assert 2 * check_update(state, manifest_of(state)) > SUM_LIMIT
    empty = {"w": torch.zeros(0)}
    assert check_update(empty, manifest_of(empty)) == 0.0


@pytest.mark.parametrize("num_examples", [1, 500, 1000])
def test_num_examples_within_cap_is_accepted(num_examples: int) -> None:
    check_num_examples(num_examples, cap=1000)


@pytest.mark.parametrize("num_examples", [0, -1, -(10**9)])
def test_non_positive_num_examples_is_rejected(num_examples: int) -> None:
    with pytest.raises(UpdateRejected, match="must be positive") as info:
        check_num_examples(num_examples, cap=1000)
    assert info.value.code == "INVALID_ARGUMENT"


def test_num_examples_above_cap_is_rejected_naming_the_cap() -> None:
    with pytest.raises(UpdateRejected, match="1001 exceeds this federation's cap of 1000") as info:
        check_num_examples(1001, cap=1000)
    assert info.value.code == "INVALID_ARGUMENT"


def test_finite_metrics_up_to_the_limit_are_accepted() -> None:
    check_metrics({})
    check_metrics({f"m{i}": float(i) for i in range(MAX_METRICS)})


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_non_finite_metric_is_rejected_naming_it(bad_value: float) -> None:
    with pytest.raises(UpdateRejected, match="metric 'loss' is not finite") as info:
        check_metrics({"accuracy": 0.9, "loss": bad_value})
    assert info.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize("name", ["", "x" * 65, "a b", "\x1b[2J", "1st", "../loss"])
def test_a_metric_name_that_is_not_short_and_plain_is_rejected(name: str) -> None:
    with pytest.raises(UpdateRejected, match="metric name") as info:
        check_metrics({name: 1.0})
    assert info.value.code == "INVALID_ARGUMENT"


def test_too_many_metrics_are_rejected() -> None:
    metrics = {f"m{i}": 0.0 for i in range(MAX_METRICS + 1)}
    with pytest.raises(UpdateRejected, match=f"at most {MAX_METRICS} metrics") as info:
        check_metrics(metrics)
    assert info.value.code == "INVALID_ARGUMENT"


def test_huge_but_finite_values_are_not_mistaken_for_inf() -> None:
    # The fast finiteness check sums the tensor; a sum that overflows must fall back to the
    # exact elementwise check instead of refusing a legitimate update.
    state = {"w": torch.full((8,), 3e38), "h": torch.full((4,), 60000.0, dtype=torch.float16)}
    check_update(state, manifest_of(state))


def test_inf_hidden_among_huge_values_is_still_found() -> None:
    weights = torch.full((8,), 3e38)
    weights[3] = float("inf")
    state = {"w": weights}
    with pytest.raises(UpdateRejected, match="NaN or Inf"):
        check_update(state, manifest_of({"w": torch.zeros(8)}))
