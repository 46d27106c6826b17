"""Tests for the RDP accountant against published and closed-form values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlink.common.accounting import MechanismStep, PrivacyAccountant


def test_poisson_subsampled_gaussian_reproduces_the_known_epsilon() -> None:
    # q = 0.1, z = 1.0, 100 rounds, delta = 1e-3 -> epsilon ~ 5.6 (issue 6; Opacus gives 5.64).
    accountant = PrivacyAccountant()
    for _ in range(100):
        accountant.step(MechanismStep(noise_multiplier=1.0, sample_rate=0.1))
    epsilon, order = accountant.spent(delta=1e-3)
    assert epsilon == pytest.approx(5.6, abs=0.1)
    assert 1 < order < 64
    # Composing 100 steps at once is the same as stepping 100 times.
    batched = PrivacyAccountant((MechanismStep(1.0, 0.1, steps=100),))
    assert batched.epsilon(1e-3) == pytest.approx(epsilon, rel=1e-9)


def test_rdp_curve_matches_the_published_dp_sgd_mnist_value() -> None:
    """TensorFlow Privacy's MNIST tutorial (Abadi et al.'s setting): 60,000 examples, batch 256,
    noise 1.1, 60 epochs, delta 1e-5 -> epsilon 3.01 with the classic RDP conversion
    epsilon = min_a RDP(a) + log(1/delta) / (a - 1). The tighter conversion we report is lower."""
    accountant = PrivacyAccountant((MechanismStep(1.1, 256 / 60_000, steps=60 * 60_000 // 256),))
    orders = np.array(accountant.orders)
    classic = float(np.min(accountant.rdp + math.log(1 / 1e-5) / (orders - 1)))
    assert classic == pytest.approx(3.01, abs=0.02)
    assert accountant.epsilon(1e-5) < classic


def test_full_participation_is_the_plain_gaussian_mechanism() -> None:
    # q = 1: RDP(a) = T * a / (2 z^2) exactly (Mironov 2017, proposition 7).
    z, rounds = 2.0, 30
    accountant = PrivacyAccountant((MechanismStep(z, 1.0, steps=rounds),))
    orders = np.array(accountant.orders)
    assert np.allclose(accountant.rdp, rounds * orders / (2 * z**2))


def test_epsilon_grows_with_rounds_and_budget_check_looks_ahead() -> None:
    accountant = PrivacyAccountant()
    step = MechanismStep(noise_multiplier=1.0, sample_rate=0.2)
    assert accountant.spent(1e-5)[0] == 0.0
    previous = 0.0
    for _ in range(5):
        ahead = accountant.epsilon_after(step, 1e-5)
        accountant.step(step)
        assert accountant.epsilon(1e-5) == pytest.approx(ahead)
        assert ahead > previous
        previous = ahead
    restored = PrivacyAccountant(tuple(accountant.history))
    assert restored.epsilon(1e-5) == pytest.approx(accountant.epsilon(1e-5))


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="sampling rate"):
        MechanismStep(1.0, 0.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        MechanismStep(0.0, 0.5)
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant().epsilon(1.0)
