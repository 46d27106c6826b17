"""Record-level DP-SGD in the built-in training loop (`train_classifier` with `TrainConfig.dpsgd`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedlink.common.accounting import MechanismStep, PrivacyAccountant
from fedlink.common.errors import TaskError
from fedlink.common.tasks import cifar10, cifar10_resnet18, digits, mnist
from fedlink.common.tasks.base import (
    ClientData,
    DataRequest,
    DPSGDConfig,
    TensorExamples,
    TrainConfig,
)
from fedlink.common.tasks.training import check_dpsgd_model, train_classifier

CPU = torch.device("cpu")


def _examples(n: int, seed: int = 0) -> ClientData:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 6, generator=generator)
    features[:3] *= 50  # these examples' gradients are far above any small clipping norm
    labels = torch.randint(0, 3, (n,), generator=generator)
    return ClientData(train=TensorExamples(features, labels))


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _one_full_batch_step(z: float, clip: float) -> TrainConfig:
    # batch_size >= N gives sampling rate 1: every example is in the single step of the epoch.
    return TrainConfig(
        local_epochs=1,
        batch_size=1000,
        learning_rate=1.0,
        momentum=0.0,
        dpsgd=DPSGDConfig(noise_multiplier=z, max_grad_norm=clip),
    )


def test_each_examples_gradient_is_clipped_before_the_average() -> None:
    data, clip = _examples(8), 0.5
    model = _linear()
    before = _flat(model)
    expected = torch.zeros_like(before)
    norms = []
    assert isinstance(data.train, TensorExamples)
    for x, y in zip(data.train.features, data.train.labels, strict=True):
        model.zero_grad()
        torch.autograd.backward(F.cross_entropy(model(x[None]), y[None]))
        gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        norms.append(float(gradient.norm()))
        expected += gradient * min(1.0, clip / (float(gradient.norm()) + 1e-6))
    model.zero_grad()
    assert max(norms) > 10 * clip > min(norms) * 2  # some examples are clipped, some are not

    # A negligible noise multiplier: the step is the mean of the clipped per-example gradients.
    result = train_classifier(model, data, _one_full_batch_step(1e-9, clip), CPU)

    step = before - _flat(model)
    assert torch.allclose(step, expected / 8, atol=1e-6)
    assert float(step.norm()) <= clip  # no example moved the model by more than clip / N
    assert result.dpsgd == MechanismStep(1e-9, 1.0, 1)

    plain = _linear()  # ordinary SGD on the same batch moves far more: the big gradients count
    train_classifier(plain, data, TrainConfig(batch_size=1000, learning_rate=1.0, momentum=0), CPU)
    assert float((before - _flat(plain)).norm()) > 5 * float(step.norm())


def test_a_huge_noise_multiplier_moves_the_model_by_noise_of_the_expected_scale() -> None:
    data = digits.load_data(DataRequest(num_partitions=10, partition_index=3))
    model = digits.build_model()
    before = _flat(model)
    z, clip = 1000.0, 1.0
    result = train_classifier(model, data, _one_full_batch_step(z, clip), CPU)
    change = before - _flat(model)
    # lr 1 and the sum divided by the N examples: noise N(0, (z C / N)^2) on each coordinate,
    # against a clipped signal of norm at most C / N ... C over 9,610 coordinates.
    assert result.num_examples > 0
    expected_std = z * clip / result.num_examples
    assert float(change.std()) == pytest.approx(expected_std, rel=0.05)
    assert abs(float(change.mean())) < 0.05 * expected_std


def test_the_clients_model_keeps_plain_names_and_no_opacus_hooks_across_rounds() -> None:
    data = digits.load_data(DataRequest(num_partitions=10, partition_index=0))
    model = digits.build_model()
    names = list(model.state_dict())
    config = TrainConfig(batch_size=16, dpsgd=DPSGDConfig(noise_multiplier=1.0))
    for _ in range(2):  # a model left wrapped or hooked would fail the second wrapping
        train_classifier(model, data, config, CPU)
        assert list(model.state_dict()) == names
        for module in model.modules():
            assert not module._forward_hooks and not module._forward_pre_hooks
            assert not module._backward_hooks and not module._backward_pre_hooks
        assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    result = train_classifier(model, data, TrainConfig(batch_size=16), CPU)  # plain SGD again
    assert result.dpsgd is None and math.isfinite(result.loss)


def test_rounds_account_poisson_sampled_steps_and_epsilon_matches_opacus() -> None:
    from opacus.accountants import RDPAccountant

    data = digits.load_data(DataRequest(num_partitions=10, partition_index=1))
    model = digits.build_model()
    z, batch, epochs, delta = 1.1, 16, 2, 1e-5
    config = TrainConfig(local_epochs=epochs, batch_size=batch, dpsgd=DPSGDConfig(z, 1.0, delta))
    ours, theirs = PrivacyAccountant(), RDPAccountant()
    epsilons = []
    for _ in range(3):
        result = train_classifier(model, data, config, CPU)
        assert result.dpsgd is not None
        steps_per_epoch = math.ceil(result.num_examples / batch)
        assert result.dpsgd == MechanismStep(z, 1 / steps_per_epoch, epochs * steps_per_epoch)
        ours.step(result.dpsgd)
        for _ in range(result.dpsgd.steps):
            theirs.step(noise_multiplier=z, sample_rate=result.dpsgd.sample_rate)
        epsilons.append(ours.epsilon(delta))
        assert epsilons[-1] == pytest.approx(theirs.get_epsilon(delta), rel=1e-9)
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] < math.inf


def test_a_model_with_batchnorm_is_refused_before_training_touches_it() -> None:
    with pytest.raises(TaskError, match="BatchNorm"):
        check_dpsgd_model(cifar10_resnet18.build_model())
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    config = TrainConfig(batch_size=4, dpsgd=DPSGDConfig(noise_multiplier=1.0))
    with pytest.raises(TaskError, match=r"DP-SGD cannot train this model.*BatchNorm"):
        train_classifier(model, _examples(8), config, CPU)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    for task in (digits, mnist, cifar10):  # the other built-in tasks' models can be trained
        check_dpsgd_model(task.build_model())


@pytest.mark.parametrize(
    "values",
    [
        {"noise_multiplier": 0.0},
        {"noise_multiplier": math.nan},
        {"noise_multiplier": 1.0, "max_grad_norm": -1.0},
        {"noise_multiplier": 1.0, "delta": 1.0},
    ],
)
def test_bad_dpsgd_settings_are_refused(values: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="DP-SGD"):
        DPSGDConfig(**values)
