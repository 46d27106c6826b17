"""Server optimizers: FedAvgM (Hsu et al. 2019) and FedAdagrad, FedAdam, FedYogi (Reddi et al.
2021, "Adaptive Federated Optimization", Algorithm 2).

Each wraps an aggregation strategy (FedAvg by default; a robust rule or DP-FedAvg when the
federation is configured with one) and treats the pseudo-gradient Delta = aggregate - global as
a gradient step to take with its own optimizer. Only floating tensors are stepped; integer and
bool tensors (BatchNorm's num_batches_tracked) take the aggregate's value, as under FedAvg.

Composition: the step only needs the aggregate, so every optimizer works over secure
aggregation's decoded mean, over DP-FedAvg's noised mean (post-processing: no extra privacy
cost) and over a robust rule's aggregate. The optimizer state (O(model) per moment, in the
accumulator dtype) is checkpointed, so a resumed run steps exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping

import torch

from fedlink.common.errors import ConfigError
from fedlink.common.tensors import StateDict
from fedlink.server.aggregation import accumulator_dtype
from fedlink.server.strategy import Strategy, WrappingStrategy


class ServerOptimizer(WrappingStrategy):
    """An aggregation strategy (`inner`) followed by an optimizer step on Delta.

    Subclasses implement `update(name, delta, x)`: the new value of floating tensor `name`
    (all in the accumulator dtype), keeping their moments in `self.moments`.
    """

    # The names of the moments each tensor has, e.g. ("m", "v"): the checkpointed state.
    moment_names: tuple[str, ...] = ()

    def __init__(self, inner: Strategy | None = None) -> None:
        super().__init__(inner)
        self.moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in self.moment_names}

    def __repr__(self) -> str:
        settings = {k: v for k, v in vars(self).items() if isinstance(v, float)}
        values = ", ".join(f"{key}={value:g}" for key, value in settings.items())
        return f"{self.name}({values}) over {self.inner!r}"

    def step(self, global_state: Mapping[str, torch.Tensor], aggregate: StateDict) -> StateDict:
        new: StateDict = {}
        for name, x in global_state.items():
            if not x.dtype.is_floating_point:
                new[name] = aggregate[name]
                continue
            dtype = accumulator_dtype(x.dtype)
            x_acc = x.to(dtype)
            delta = aggregate[name].to(dtype) - x_acc
            new[name] = self.update(name, delta, x_acc).to(x.dtype)
        return new

    @abstractmethod
    def update(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x_{t+1} for tensor `name` from Delta_t and x_t; builds new moment tensors (never in
        place, so a checkpointed or snapshotted state_dict stays as it was)."""

    def moment(self, key: str, name: str, like: torch.Tensor, initial: float = 0.0) -> torch.Tensor:
        """Moment `key` of tensor `name`, created as `initial` everywhere on first use."""
        table = self.moments[key]
        if name not in table:
            table[name] = torch.full_like(like, initial)
        return table[name]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{key}/{name}": t for key, table in self.moments.items() for name, t in table.items()
        }

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        moments: dict[str, dict[str, torch.Tensor]] = {key: {} for key in self.moment_names}
        for full_name, tensor in state.items():
            key, _, name = full_name.partition("/")
            if key not in moments or not name:
                raise ValueError(f"{self.name} has no state named {full_name!r}")
            moments[key][name] = tensor.clone()
        self.moments = moments


def _check(name: str, value: float, low: float, high: float, *, closed_high: bool = False) -> float:
    value = float(value)
    inside = low <= value <= high if closed_high else low <= value < high
    if not (math.isfinite(value) and inside):
        bracket = "]" if closed_high else ")"
        raise ConfigError(f"{name} must be in [{low:g}, {high:g}{bracket}, got {value}")
    return value


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be positive and finite, got {value}")
    return value


class FedAvgM(ServerOptimizer):
    """FedAvgM (Hsu et al. 2019): v_t = beta v_{t-1} + Delta_t; x_{t+1} = x_t + eta v_t, v_{-1}=0.

    eta = 1, beta = 0 is FedAvg (up to rounding)."""

    name = "fedavgm"
    moment_names = ("v",)

    def __init__(self, eta: float = 1.0, beta: float = 0.9, inner: Strategy | None = None) -> None:
        super().__init__(inner)
        self.eta = _positive("fedavgm eta (server learning rate)", eta)
        self.beta = _check("fedavgm beta (server momentum)", beta, 0.0, 1.0)

    def update(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        v = self.moment("v", name, delta) * self.beta + delta
        self.moments["v"][name] = v
        return x + self.eta * v


class _Adaptive(ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2: m_t = beta1 m_{t-1} + (1 - beta1) Delta_t, a second
    moment v_t by the subclass's rule, x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau); m_{-1} = 0,
    v_{-1} = tau^2 (the smallest value the paper allows). No bias correction, as in the paper."""

    moment_names = ("m", "v")
    beta2: float

    def __init__(
        self,
        eta: float = 0.1,
        beta1: float = 0.9,
        beta2: float | None = 0.99,
        tau: float = 1e-3,
        inner: Strategy | None = None,
    ) -> None:
        super().__init__(inner)
        self.eta = _positive(f"{self.name} eta (server learning rate)", eta)
        self.beta1 = _check(f"{self.name} beta1", beta1, 0.0, 1.0)
        if beta2 is not None:  # FedAdagrad has none
            self.beta2 = _check(f"{self.name} beta2", beta2, 0.0, 1.0)
        self.tau = _positive(f"{self.name} tau (adaptivity)", tau)

    @abstractmethod
    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        """v_t from v_{t-1} and Delta_t^2."""

    def update(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        m = self.moment("m", name, delta) * self.beta1 + (1 - self.beta1) * delta
        v = self.second_moment(self.moment("v", name, delta, self.tau**2), delta * delta)
        self.moments["m"][name], self.moments["v"][name] = m, v
        return x + self.eta * m / (v.sqrt() + self.tau)


class FedAdagrad(_Adaptive):
    """v_t = v_{t-1} + Delta_t^2."""

    name = "fedadagrad"

    def __init__(
        self, eta: float = 0.1, beta1: float = 0.9, tau: float = 1e-3, inner: Strategy | None = None
    ) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=None, tau=tau, inner=inner)

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return v + squared


class FedAdam(_Adaptive):
    """v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * squared


class FedYogi(_Adaptive):
    """v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2)."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, squared: torch.Tensor) -> torch.Tensor:
        return v - (1 - self.beta2) * squared * torch.sign(v - squared)
