"""Client-level DP-FedAvg on the coordinator: `DPFedAvg`, a wrapper around the FedAvg rule.

Each noised round is a Gaussian mechanism with noise multiplier z (noise sigma = z * S on the sum
of updates clipped to S); the round engine accounts for it with `PrivacyAccountant`
(common/accounting.py) at sampling rate `ROUND_SAMPLE_RATE`.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from fedlink.common.accounting import MechanismStep, PrivacyAccountant
from fedlink.common.dp import add_gaussian_noise, sum_noise_std
from fedlink.common.errors import ConfigError
from fedlink.common.tensors import Manifest, StateDict
from fedlink.server.robust import AggregationRule, FedAvg, RoundUpdates, Update

if TYPE_CHECKING:  # config.py imports this module (through the strategies)
    from fedlink.server.checkpoints import Checkpoint
    from fedlink.server.config import ServerConfig

log = logging.getLogger(__name__)

# The engine's sampling is a seeded fixed-size cohort, not secret Poisson sampling: no
# amplification by sampling can be claimed, so every round is accounted at q = 1.
ROUND_SAMPLE_RATE = 1.0


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


class RoundPrivacy:
    """The coordinator's accounting of DP-FedAvg rounds: whether the next round fits in
    `dp_max_epsilon`, and the epsilon spent once a noised model is released. Restored from the
    checkpoint on resume; `for_run` is None without differential privacy."""

    def __init__(self, config: ServerConfig, accountant: PrivacyAccountant) -> None:
        self._config = config
        self._accountant = accountant
        self._mechanism = MechanismStep(config.dp_noise_multiplier, ROUND_SAMPLE_RATE)

    @classmethod
    def for_run(cls, config: ServerConfig, resume_from: Checkpoint | None) -> RoundPrivacy | None:
        """The run's accounting, or None without DP; refuses to resume a run whose rounds were
        not all accounted with the same DP setting."""
        completed = resume_from.round if resume_from else 0
        history = resume_from.privacy if resume_from else ()
        if config.dp_clip_norm is None:
            if history:
                raise ConfigError(
                    "the state directory holds a run with differential privacy; resume it with "
                    "the same dp_* settings (turning DP off mid-run would release un-noised "
                    "models)"
                )
            return None
        accountant = PrivacyAccountant(history)
        if sum(step.steps for step in accountant.history) != completed:
            raise ConfigError(
                f"the state directory holds a run whose {completed} completed rounds were not "
                "all trained with differential privacy, so no epsilon can be claimed for it; "
                "start a new run (another --state-dir) to train with DP"
            )
        log.info(
            "differential privacy: DP-FedAvg with clip norm %g, noise multiplier %g, "
            "delta %g, budget %s",
            config.dp_clip_norm,
            config.dp_noise_multiplier,
            config.dp_delta,
            "none" if config.dp_max_epsilon is None else f"epsilon {config.dp_max_epsilon:g}",
        )
        return cls(config, accountant)

    @property
    def history(self) -> tuple[MechanismStep, ...]:
        return tuple(self._accountant.history)

    def epsilon(self) -> float:
        return self._accountant.epsilon(self._config.dp_delta)

    def budget_would_be_exceeded(self, round_number: int) -> bool:
        """Whether running `round_number` would take epsilon past dp_max_epsilon (logged)."""
        budget = self._config.dp_max_epsilon
        if budget is None:
            return False
        after = self._accountant.epsilon_after(self._mechanism, self._config.dp_delta)
        if after <= budget:
            return False
        log.warning(
            "privacy budget spent: round %d would take epsilon from %.4g to %.4g, past "
            "dp_max_epsilon=%g (delta=%g); stopping after round %d of %d",
            round_number,
            self.epsilon(),
            after,
            budget,
            self._config.dp_delta,
            round_number - 1,
            self._config.num_rounds,
        )
        return True

    def account_round(self) -> float:
        """Account for the noised model just released; the epsilon spent so far."""
        self._accountant.step(self._mechanism)
        epsilon = self.epsilon()
        log.info("privacy spent: epsilon=%.4g at delta=%g", epsilon, self._config.dp_delta)
        return epsilon
