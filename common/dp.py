"""Client-level differential privacy for FedAvg (DP-FedAvg, McMahan et al., ICLR 2018).

Each client's update (local model minus global model) is clipped to L2 norm S, so one client
changes the sum of updates by at most S; Gaussian noise of standard deviation sigma = z * S on
that sum makes each round a Gaussian mechanism with noise multiplier z, which the RDP accountant
(server/privacy.py) turns into an (epsilon, delta) guarantee over the rounds.

Who adds the noise:
- plaintext aggregation: the coordinator adds N(0, sigma^2) to the sum (`sum_noise_std`);
- secure aggregation: the coordinator never sees the sum before it is noised, so each client adds
  its share (`client_noise_std`). Each of the clients adds N(0, sigma^2 / t), t being the
  minimum number of contributors (the secure-aggregation threshold): if m >= t clients survive,
  the sum carries variance m / t * sigma^2 >= sigma^2, so the guarantee holds whatever the
  dropouts, at the price of up to n / t times the variance when nobody drops. Dividing by n
  instead would leave less noise than accounted for as soon as one client drops.
Weights: the argument needs every client's contribution to the sum bounded by S. Secure
aggregation's vector (fixedpoint.py) holds (w / W) * update, at most S, but also the weight slot
sum(w / W), released without noise and dependent on how much data each client has. Under DP use
uniform weights (w = W = 1): the slot is then the number of survivors, which the coordinator
knows anyway, and the model moves by the noised sum divided by it.
Either way the noise is drawn from a ChaCha20 stream keyed from the OS's randomness (prg.py),
not from a statistical generator an adversary could predict. Floating-point sampling still has
the known weaknesses of textbook Gaussian samplers (Mironov, CCS 2012); this is not hardened.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from statistics import NormalDist

import torch

from fedlink.common import prg
from fedlink.common.tensors import StateDict


def l2_norm(update: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all floating tensors of `update` taken together, as one vector."""
    squares = [
        t.detach().to(torch.float64).pow(2).sum()
        for t in update.values()
        if t.dtype.is_floating_point
    ]
    return math.sqrt(float(torch.stack(squares).sum())) if squares else 0.0


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[StateDict, float]:
    """`update` scaled by min(1, S / ||update||) and its norm before clipping.

    Non-floating tensors (counters) are copied unchanged; they do not carry gradients.
    """
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"the clipping norm must be positive and finite, got {clip_norm}")
    norm = l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("the update has non-finite values and cannot be clipped")
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = {
        name: (tensor * factor).to(tensor.dtype)
        if tensor.dtype.is_floating_point
        else tensor.clone()
        for name, tensor in update.items()
    }
    return clipped, norm


def sum_noise_std(noise_multiplier: float, clip_norm: float) -> float:
    """sigma = z * S: the noise the sum of clipped updates needs for noise multiplier z."""
    _check_noise(noise_multiplier, clip_norm)
    return noise_multiplier * clip_norm


def client_noise_std(noise_multiplier: float, clip_norm: float, min_contributors: int) -> float:
    """sigma / sqrt(t): each client's share when at least `min_contributors` (t) noisy updates
    always reach the sum, so that the sum's noise never falls below sigma."""
    if min_contributors < 1:
        raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
    return sum_noise_std(noise_multiplier, clip_norm) / math.sqrt(min_contributors)


def secure_value_bound(
    clip_norm: float, noise_std: float, dimension: int, failure_probability: float = 1e-9
) -> float:
    """The bound V to give secure aggregation's fixed-point encoding for clipped, noised updates.

    A coordinate of an update clipped to S is at most S in magnitude; with noise N(0, s^2) added,
    all `dimension` coordinates stay within S + s * Phi^-1(1 - p / (2 d)) except with probability
    p (union bound), so the encoder's refusal of out-of-bound values practically never fires.
    """
    if dimension < 1:
        raise ValueError(f"dimension must be >= 1, got {dimension}")
    if not 0 < failure_probability < 1:
        raise ValueError(f"failure_probability must be in (0, 1), got {failure_probability}")
    _check_noise(0.0, clip_norm)
    if noise_std == 0:
        return clip_norm
    return clip_norm + noise_std * NormalDist().inv_cdf(1 - failure_probability / (2 * dimension))


def add_gaussian_noise(
    update: Mapping[str, torch.Tensor], std: float, *, key: bytes | None = None
) -> StateDict:
    """`update` plus independent N(0, std^2) noise on every floating coordinate.

    `key` (32 bytes) makes the noise reproducible for tests; by default it is fresh randomness.
    """
    stream_key = secrets.token_bytes(prg.KEY_BYTES) if key is None else key
    total = sum(t.numel() for t in update.values() if t.dtype.is_floating_point)
    noise = torch.from_numpy(prg.gaussian(stream_key, total, std))
    noisy: StateDict = {}
    offset = 0
    for name, tensor in update.items():
        if not tensor.dtype.is_floating_point:
            noisy[name] = tensor.clone()
            continue
        chunk = noise[offset : offset + tensor.numel()].reshape(tensor.shape)
        noisy[name] = (tensor.to(torch.float64) + chunk).to(tensor.dtype)
        offset += tensor.numel()
    return noisy


def _check_noise(noise_multiplier: float, clip_norm: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"the noise multiplier must be finite and >= 0, got {noise_multiplier}")
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"the clipping norm must be positive and finite, got {clip_norm}")
