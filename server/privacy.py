"""Client-level DP-FedAvg on the coordinator (`DPFedAvg`, a wrapper around the FedAvg rule) and
its privacy accounting: (epsilon, delta) spent after every round.

Each noised round is a subsampled Gaussian mechanism with noise multiplier z (noise sigma = z * S
on the sum of updates clipped to S) and sampling rate q (the chance that a given client takes
part). Its Renyi-DP at each order alpha comes from Mironov, Talwar and Zhang, "Renyi Differential
Privacy of the Sampled Gaussian Mechanism" (2019), as implemented by Opacus; RDP adds up over
rounds, and the total converts to (epsilon, delta) with the conversion of Balle et al. (2020),
minimised over the orders.

The analysis assumes Poisson sampling (each client independently with probability q). With
full participation use q = 1: there is no amplification by sampling then.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from fedlink.common.dp import add_gaussian_noise, sum_noise_std
from fedlink.common.errors import ConfigError
from fedlink.common.tensors import Manifest, StateDict
from fedlink.server.robust import AggregationRule, FedAvg, RoundUpdates, Update

log = logging.getLogger(__name__)

# The engine's sampling is a seeded fixed-size cohort, not secret Poisson sampling: no
# amplification by sampling can be claimed, so every round is accounted at q = 1.
ROUND_SAMPLE_RATE = 1.0

# Opacus's default orders: dense where the optimum usually lies, up to 63.
DEFAULT_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *map(float, range(12, 64)),
)


@dataclass(frozen=True)
class MechanismStep:
    """`steps` rounds of the Gaussian mechanism with noise multiplier z and sampling rate q."""

    noise_multiplier: float
    sample_rate: float
    steps: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"the noise multiplier must be positive and finite, got {self.noise_multiplier}"
            )
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"the sampling rate must be in (0, 1], got {self.sample_rate}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


class PrivacyAccountant:
    """Composes the rounds' RDP; `history` is all the state a checkpoint needs to resume."""

    def __init__(
        self, history: tuple[MechanismStep, ...] = (), orders: tuple[float, ...] = DEFAULT_ORDERS
    ) -> None:
        if not orders or min(orders) <= 1:
            raise ValueError("RDP orders must be > 1")
        self.orders = orders
        self.history: list[MechanismStep] = []
        self._rdp: NDArray[np.float64] = np.zeros(len(orders))
        for step in history:
            self.step(step)

    @property
    def rdp(self) -> NDArray[np.float64]:
        """The composed Renyi-DP at each of `orders`."""
        copy: NDArray[np.float64] = self._rdp.copy()
        return copy

    def step(self, step: MechanismStep) -> None:
        """Account for `step.steps` more rounds."""
        self._rdp += self._rdp_of(step)
        self.history.append(step)

    def spent(self, delta: float) -> tuple[float, float]:
        """(epsilon, the optimal order) spent so far at `delta`; (0, nan) before any round."""
        _check_delta(delta)
        if not self.history:
            return 0.0, math.nan
        return _convert(self.orders, self._rdp, delta)

    def epsilon(self, delta: float) -> float:
        return self.spent(delta)[0]

    def epsilon_after(self, step: MechanismStep, delta: float) -> float:
        """The epsilon that accounting for `step` as well would give: lets a federation stop
        before the round that would exceed its budget instead of after it."""
        _check_delta(delta)
        return _convert(self.orders, self._rdp + self._rdp_of(step), delta)[0]

    def _rdp_of(self, step: MechanismStep) -> NDArray[np.float64]:
        from opacus.accountants.analysis.rdp import compute_rdp  # see _convert

        rdp: NDArray[np.float64] = np.asarray(
            compute_rdp(
                q=step.sample_rate,
                noise_multiplier=step.noise_multiplier,
                steps=step.steps,
                orders=list(self.orders),
            ),
            dtype=np.float64,
        )
        return rdp


def compact(history: Iterable[MechanismStep]) -> tuple[MechanismStep, ...]:
    """`history` with consecutive steps of the same mechanism merged (what a checkpoint stores)."""
    merged: list[MechanismStep] = []
    for step in history:
        last = merged[-1] if merged else None
        if last is not None and (last.noise_multiplier, last.sample_rate) == (
            step.noise_multiplier,
            step.sample_rate,
        ):
            merged[-1] = MechanismStep(
                last.noise_multiplier, last.sample_rate, last.steps + step.steps
            )
        else:
            merged.append(step)
    return tuple(merged)


class DPFedAvg(AggregationRule):
    """DP-FedAvg (McMahan et al., ICLR 2018) wrapped around the FedAvg rule.

    Each update's change from the global model is clipped to L2 norm S (all floating tensors
    together), the clipped changes are summed with uniform weights, N(0, (z S)^2) is added to
    every coordinate of the sum and the result is divided by the number of updates m.

    Uniform weights, not sample counts: a client's sample count is self-reported and unbounded
    (up to `max_num_examples`), so with count weights one client could move the average by up to
    S times its share of the weight, and the count itself would leak; with uniform weights each
    client changes the sum by at most S, which is what z S is calibrated to. m is known to the
    coordinator anyway, so dividing by it is post-processing. The sensitivity S is for adding or
    removing one client's data (its update replaced by at most a zero update); replacing one
    client's update by an arbitrary other one would be 2 S.
    """

    def __init__(self, inner: AggregationRule, noise_multiplier: float, clip_norm: float) -> None:
        if type(inner) is not FedAvg:
            raise ConfigError(f"DP-FedAvg wraps the fedavg rule, not {inner.name}")
        self.inner = inner
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clip_norm
        self.sum_std = sum_noise_std(noise_multiplier, clip_norm)
        self.name = f"dp {inner.name}"

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        manifest: Manifest,
    ) -> StateDict:
        uniform = [(1.0, state) for _, state in updates]
        return super().aggregate(global_state, uniform, manifest)

    def combine(self, updates: RoundUpdates) -> StateDict:
        norms = updates.norms()
        factors = [min(1.0, self.clip_norm / n) if n > 0 else 1.0 for n in norms]
        log.info(
            "DP: clipped %d of %d updates to norm %.4g (median norm %.4g); noise std %.4g on the "
            "sum",
            sum(f < 1.0 for f in factors),
            len(norms),
            self.clip_norm,
            statistics.median(norms),
            self.sum_std,
        )
        mean = self.inner.combine(updates.rescaled(factors))
        # Noise N(0, (z S)^2) on the sum is N(0, (z S / m)^2) on the mean.
        return add_gaussian_noise(mean, self.sum_std / len(updates))


def _convert(
    orders: tuple[float, ...], rdp: NDArray[np.float64], delta: float
) -> tuple[float, float]:
    # Opacus is imported on first use: importing it takes seconds (it loads its whole training
    # machinery), and a federation without differential privacy never needs it.
    from opacus.accountants.analysis.rdp import get_privacy_spent

    epsilon, order = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(epsilon), float(order)


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
