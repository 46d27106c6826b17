"""Tests for DP-FedAvg's client-side math: clipping and Gaussian noise, plain and split."""

from __future__ import annotations

import math

import pytest
import torch

from fedlink.common.dp import (
    add_gaussian_noise,
    client_noise_std,
    clip_update,
    l2_norm,
    secure_value_bound,
    sum_noise_std,
)


def _update() -> dict[str, torch.Tensor]:
    return {
        "w": torch.full((3, 4), 2.0),
        "b": torch.full((4,), -2.0, dtype=torch.float64),
        "n": torch.tensor(5),
    }


def test_clipping_scales_a_large_update_to_the_norm_and_keeps_direction() -> None:
    update = _update()
    norm = l2_norm(update)
    assert norm == pytest.approx(math.sqrt(16 * 4.0))
    clipped, original = clip_update(update, 1.0)
    assert original == pytest.approx(norm)
    assert l2_norm(clipped) == pytest.approx(1.0)
    assert torch.allclose(clipped["w"], update["w"] / norm)
    assert clipped["b"].dtype == torch.float64
    assert torch.equal(clipped["n"], update["n"])  # counters untouched


def test_clipping_leaves_a_small_update_unchanged() -> None:
    update = _update()
    clipped, _ = clip_update(update, 100.0)
    for name in update:
        assert torch.equal(clipped[name], update[name])
    with pytest.raises(ValueError, match="clipping norm"):
        clip_update(update, 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        clip_update({"w": torch.tensor([float("inf")])}, 1.0)


def test_noise_scales() -> None:
    assert sum_noise_std(1.1, 0.5) == pytest.approx(0.55)
    assert client_noise_std(1.0, 2.0, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        sum_noise_std(-1.0, 1.0)


def test_split_noise_of_threshold_clients_adds_up_to_the_noise_of_the_sum() -> None:
    """t clients each adding N(0, sigma^2 / t) give the sum exactly the variance sigma^2; more
    survivors only add noise."""
    z, clip, threshold, size = 1.2, 0.8, 6, 50_000
    zero = {"w": torch.zeros(size, dtype=torch.float64)}
    per_client = client_noise_std(z, clip, threshold)
    noisy = [add_gaussian_noise(zero, per_client)["w"] for _ in range(threshold)]
    total = torch.stack(noisy).sum(dim=0)
    assert float(total.std()) == pytest.approx(sum_noise_std(z, clip), rel=0.02)
    # Noise of different clients is independent.
    assert abs(float(torch.corrcoef(torch.stack([noisy[0], noisy[1]]))[0, 1])) < 0.03


def test_secure_value_bound_covers_clipped_noisy_coordinates() -> None:
    assert secure_value_bound(2.0, 0.0, 10) == 2.0
    bound = secure_value_bound(1.0, 0.5, 1_000_000)
    # 1 + 0.5 * Phi^-1(1 - 5e-16) = 1 + 0.5 * 8.03
    assert bound == pytest.approx(1.0 + 0.5 * 8.03, abs=0.01)
    noisy = add_gaussian_noise({"w": torch.zeros(1_000_000, dtype=torch.float64)}, 0.5)["w"]
    assert float(noisy.abs().max()) < bound - 1.0
    with pytest.raises(ValueError, match="failure_probability"):
        secure_value_bound(1.0, 0.5, 10, failure_probability=0.0)


def test_noise_is_added_to_floating_tensors_only_and_reproducible_with_a_key() -> None:
    update = _update()
    noisy = add_gaussian_noise(update, 0.5, key=b"n" * 32)
    again = add_gaussian_noise(update, 0.5, key=b"n" * 32)
    assert all(torch.equal(noisy[name], again[name]) for name in update)
    assert noisy["w"].dtype == torch.float32 and noisy["b"].dtype == torch.float64
    assert torch.equal(noisy["n"], update["n"])
    assert not torch.equal(noisy["w"], update["w"])
    fresh = add_gaussian_noise(update, 0.5)
    assert not torch.equal(fresh["w"], noisy["w"])
