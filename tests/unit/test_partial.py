"""Partial models (common/partial.py): which tensors travel, stay local or are frozen, and the
frozen tensors' hash that every site must match."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedlink.common.errors import ConfigError, TaskError
from fedlink.common.partial import TensorSelection, federated_part, frozen_digest
from fedlink.common.tasks import load_task
from fedlink.common.tasks.contract import exchanged_tensors
from fedlink.common.tensors import StateDict


def _state() -> StateDict:
    generator = torch.Generator().manual_seed(0)
    return {
        "base.weight": torch.randn(4, 3, generator=generator),
        "bn.running_mean": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(3),
        "head.weight": torch.randn(2, 4, generator=generator),
        "head.bias": torch.zeros(2),
    }


def test_local_tensors_never_travel_and_exchanged_ones_are_the_only_others_that_do() -> None:
    state = _state()
    fedbn = TensorSelection(local=("bn.*",))
    assert sorted(fedbn.travelling(state)) == ["base.weight", "head.bias", "head.weight"]
    assert fedbn.frozen(state) == {}
    both = TensorSelection(exchanged=("head.*", "bn.*"), local=("bn.*",))
    assert sorted(both.travelling(state)) == ["head.bias", "head.weight"]
    assert sorted(both.frozen(state)) == ["base.weight"]
    assert sorted(both.local_part(state)) == ["bn.num_batches_tracked", "bn.running_mean"]
    assert not TensorSelection().partial and TensorSelection().travelling(state) == state


def test_the_frozen_digest_covers_names_dtypes_shapes_and_values_in_any_order() -> None:
    frozen = {"a": torch.ones(2, 2), "b": torch.arange(3)}
    digest = frozen_digest(frozen)
    assert digest == frozen_digest(dict(reversed(list(frozen.items()))))
    assert len(digest) == 32 and frozen_digest({}) == b""
    changed = {"a": torch.ones(2, 2), "b": torch.tensor([0, 1, 3])}
    reshaped = {"a": torch.ones(4), "b": torch.arange(3)}
    renamed = {"A": torch.ones(2, 2), "b": torch.arange(3)}
    retyped = {"a": torch.ones(2, 2, dtype=torch.float64), "b": torch.arange(3)}
    assert len({digest, *map(frozen_digest, (changed, reshaped, renamed, retyped))}) == 5


def test_the_coordinator_keeps_the_travelling_part_and_checks_a_pinned_frozen_hash() -> None:
    state = _state()
    selection = TensorSelection(exchanged=("head.*",))
    travelling, digest = federated_part(selection, state, None)
    assert sorted(travelling) == ["head.bias", "head.weight"]
    assert digest == frozen_digest(
        {k: state[k] for k in ("base.weight", "bn.running_mean", "bn.num_batches_tracked")}
    )
    assert federated_part(selection, state, digest.hex())[1] == digest
    with pytest.raises(ConfigError, match="frozen tensors of the coordinator's model hash to"):
        federated_part(selection, state, "0" * 64)


@pytest.mark.parametrize(
    ("selection", "says"),
    [
        (TensorSelection(exchanged=("heads.*",)), "pattern 'heads.*' matches no tensor"),
        (TensorSelection(local=("*",)), "leave no tensor of the model to exchange"),
        (TensorSelection(exchanged=("bn.*",), local=("bn.*",)), "leave no tensor"),
    ],
)
def test_patterns_that_do_not_fit_the_model_are_refused(
    selection: TensorSelection, says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        selection.check_model(_state())


def test_a_hostile_number_or_size_of_patterns_is_refused() -> None:
    with pytest.raises(ConfigError, match="at most 64 patterns"):
        TensorSelection(local=("x",) * 65)
    with pytest.raises(ConfigError, match="1 to 256 characters"):
        TensorSelection(exchanged=("x" * 300,))


def test_a_task_may_declare_the_tensors_it_exchanges() -> None:
    assert exchanged_tensors(load_task("causal-lm")) == ("*lora_*",)
    assert exchanged_tensors(load_task("digits")) == ()
    with pytest.raises(TaskError, match="EXCHANGED_TENSORS must be a tuple"):
        exchanged_tensors(SimpleNamespace(EXCHANGED_TENSORS="*lora_*"))  # type: ignore[arg-type]


def test_freezing_stops_training_the_parameters_that_neither_travel_nor_stay_local() -> None:
    model = torch.nn.Sequential()
    model.add_module("base", torch.nn.Linear(3, 4))
    model.add_module("bn", torch.nn.BatchNorm1d(4))
    model.add_module("head", torch.nn.Linear(4, 2))
    TensorSelection(exchanged=("head.*",), local=("bn.*",)).freeze(model)
    trained = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trained == ["bn.bias", "bn.weight", "head.bias", "head.weight"]
    TensorSelection().freeze(model)  # nothing frozen: nothing changes, nothing is unfrozen
    assert not model.base.weight.requires_grad and model.head.weight.requires_grad
