"""Tests for the simulated attacks: each one's effect on a real digits training round."""

from __future__ import annotations

import pytest
import torch

from fedlink.client.attacks import (
    ALIE,
    Attack,
    FlippedLabels,
    GaussianNoise,
    LabelFlip,
    Scaling,
    SignFlip,
    alie_state,
    alie_z,
    parse_attack,
    snapshot,
)
from fedlink.common.errors import ConfigError
from fedlink.common.tasks import digits
from fedlink.common.tasks.base import ClientData, DataRequest, TensorExamples, TrainConfig
from fedlink.common.tensors import StateDict

CPU = torch.device("cpu")
CONFIG = TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.05, seed=7)


def _client_data() -> ClientData:
    return digits.load_data(DataRequest(partition="iid", partition_index=0, num_partitions=4))


def _start() -> torch.nn.Module:
    torch.manual_seed(0)
    return digits.build_model()


def _honest(config: TrainConfig = CONFIG, data: ClientData | None = None) -> StateDict:
    model = _start()
    digits.train(model, data or _client_data(), config, CPU)
    return snapshot(model)


def _attacked(attack: Attack, config: TrainConfig = CONFIG) -> tuple[StateDict, StateDict]:
    """(global model, what the attacker sends) for one round from the same start as `_honest`."""
    model = _start()
    global_state = snapshot(model)
    attack.train(digits, model, _client_data(), config, CPU)
    return global_state, snapshot(model)


def _delta(state: StateDict, global_state: StateDict) -> torch.Tensor:
    return torch.cat([(state[n] - global_state[n]).flatten() for n in sorted(global_state)])


def test_sign_flip_sends_the_honest_delta_negated() -> None:
    global_state, sent = _attacked(SignFlip())
    honest = _honest()
    assert torch.allclose(_delta(sent, global_state), -_delta(honest, global_state), atol=1e-6)


def test_scaling_sends_the_label_flipped_delta_times_the_factor() -> None:
    global_state, sent = _attacked(Scaling(factor=10.0))
    _, flipped = _attacked(LabelFlip())
    expected = 10.0 * _delta(flipped, global_state)
    assert torch.allclose(_delta(sent, global_state), expected, atol=1e-5)


def test_gaussian_noise_replaces_the_update_with_seeded_noise_of_sigma() -> None:
    global_state, sent = _attacked(GaussianNoise(sigma=200.0))
    noise = _delta(sent, global_state)
    assert noise.std().item() == pytest.approx(200.0, rel=0.05)
    assert abs(noise.mean().item()) < 10.0
    _, again = _attacked(GaussianNoise(sigma=200.0))
    assert torch.equal(_delta(again, global_state), noise)
    _, other_seed = _attacked(GaussianNoise(sigma=200.0), TrainConfig(seed=8))
    assert not torch.equal(_delta(other_seed, global_state), noise)


def test_flipped_labels_map_y_to_nine_minus_y() -> None:
    dataset = FlippedLabels(TensorExamples(torch.zeros(10, 2), torch.arange(10)))
    assert [int(dataset[i][1]) for i in range(10)] == list(range(9, -1, -1))
    assert len(dataset) == 10


def test_label_flipping_teaches_the_model_the_wrong_classes() -> None:
    config = TrainConfig(local_epochs=10, learning_rate=0.05, seed=1)
    data = digits.load_data(DataRequest())
    test = digits.load_test_data()
    honest = _start()
    digits.train(honest, data, config, CPU)
    poisoned = _start()
    LabelFlip().train(digits, poisoned, data, config, CPU)
    assert digits.evaluate(honest, test, CPU).accuracy > 0.9
    assert digits.evaluate(poisoned, test, CPU).accuracy < 0.1
    assert digits.evaluate(poisoned, FlippedLabels(test), CPU).accuracy > 0.9


def test_alie_state_is_mean_minus_z_standard_deviations_of_the_honest_deltas() -> None:
    global_state = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    honest = [
        {"w": torch.tensor([2.0, 1.0]), "n": torch.tensor(4)},
        {"w": torch.tensor([4.0, 1.0]), "n": torch.tensor(5)},
    ]
    sent = alie_state(global_state, honest, z=1.5)
    # deltas (1, 0) and (3, 0): mean (2, 0), sample std (sqrt 2, 0)
    assert torch.allclose(sent["w"], torch.tensor([1.0 + 2.0 - 1.5 * 2**0.5, 1.0]))
    assert sent["n"].item() == 4
    with pytest.raises(ConfigError, match="at least two honest models"):
        alie_state(global_state, honest[:1], z=1.0)


def test_alie_z_matches_the_papers_z_max() -> None:
    # n = 10, f = 3: s = floor(10 / 2 + 1) - 3 = 3, z = Phi^-1((10 - 3) / 10) = 0.5244
    assert alie_z(10, 3) == pytest.approx(0.5244, abs=1e-4)
    # n = 50, f = 12 (the paper's setting): s = 14, z = Phi^-1(0.72) = 0.5828
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)


def test_a_lone_alie_client_shifts_its_bootstrap_mean_by_z_deviations() -> None:
    global_state, mean_only = _attacked(ALIE(z=0.0, estimates=3))
    _, shifted = _attacked(ALIE(z=2.0, estimates=3))
    honest = _delta(_honest(), global_state)
    at_mean = _delta(mean_only, global_state)
    # With z = 0 it sends the mean of honest-looking models: close to an honest update...
    assert torch.cosine_similarity(at_mean, honest, dim=0) > 0.8
    # ...and z > 0 moves every coordinate down from there, by z standard deviations.
    moved = _delta(shifted, global_state)
    assert bool((moved <= at_mean + 1e-6).all()) and bool((moved < at_mean - 1e-6).any())


def test_parse_attack_reads_each_spec_and_its_defaults() -> None:
    assert isinstance(parse_attack("sign-flip", 10), SignFlip)
    assert isinstance(parse_attack("label-flip", 10), LabelFlip)
    scaling = parse_attack("scaling", 10)
    assert isinstance(scaling, Scaling) and scaling.factor == 10.0
    scaling = parse_attack("scaling,factor=25", 1)
    assert isinstance(scaling, Scaling) and scaling.factor == 25.0
    gaussian = parse_attack("gaussian", 1)
    assert isinstance(gaussian, GaussianNoise) and gaussian.sigma == 200.0
    alie = parse_attack("alie, z=0.5, estimates=6", 1)
    assert isinstance(alie, ALIE) and (alie.z, alie.estimates) == (0.5, 6)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("backdoor", "unknown attack 'backdoor'"),
        ("scaling", "scaling factor must be > 1"),
        ("gaussian,sigma=-1", "sigma must be positive"),
        ("gaussian,z=1", "gaussian takes \\['sigma'\\]"),
        ("alie,z=abc", "z must be a number"),
        ("alie,z=inf", "z must be finite"),
        ("alie,estimates=1", "estimates must be an integer >= 2"),
        ("sign-flip,factor=2", "sign-flip takes \\[\\]"),
    ],
)
def test_parse_attack_refuses_malformed_specs(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_attack(spec, 1)
