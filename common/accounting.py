"""Renyi-DP accounting: the (epsilon, delta) spent by repeated subsampled Gaussian mechanisms.

Used by the coordinator for client-level DP-FedAvg (one mechanism per round, server/privacy.py)
and by each client for record-level DP-SGD (one mechanism per local step,
common/tasks/training.py). Each step is a subsampled Gaussian mechanism with noise multiplier z
and sampling rate q; its Renyi-DP at each order alpha comes from Mironov, Talwar and Zhang, "Renyi
Differential Privacy of the Sampled Gaussian Mechanism" (2019), as implemented by Opacus; RDP adds
up over steps, and the total converts to (epsilon, delta) with the conversion of Balle et al.
(2020), minimised over the orders.

The analysis assumes Poisson sampling (each participant independently with probability q, with
randomness the adversary does not know). Without it use q = 1: there is no amplification by
sampling then.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

# Opacus's default orders: dense where the optimum usually lies, up to 63.
DEFAULT_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *map(float, range(12, 64)),
)


@dataclass(frozen=True)
class MechanismStep:
    """`steps` applications (rounds, or local DP-SGD steps) of the subsampled Gaussian mechanism
    with noise multiplier z and sampling rate q."""

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
    """Composes the steps' RDP; `history` is all the state a checkpoint needs to resume."""

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
        """Account for `step.steps` more steps."""
        self._rdp += self._rdp_of(step)
        self.history.append(step)

    def spent(self, delta: float) -> tuple[float, float]:
        """(epsilon, the optimal order) spent so far at `delta`; (0, nan) before any step."""
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
