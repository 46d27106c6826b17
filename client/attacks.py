"""EVALUATION ONLY: simulated Byzantine clients, to measure how robust aggregation holds up.

Nothing here runs unless a client is started with `--simulate-attack SPEC`, and such a client
logs a warning for every update it poisons. The attacks are the usual ones in the literature:

    sign-flip                  send global - delta instead of global + delta
    scaling[,factor=F]         model replacement (Bagdasaryan et al. 2020): train on flipped
                               labels, then send global + F x delta so that the poisoned model
                               outweighs everyone else (F defaults to the number of clients)
    gaussian[,sigma=S]         send global + N(0, S^2) noise, S = 200 by default
    label-flip                 train on labels y -> 9 - y (the built-in tasks have 10 classes)
    alie[,z=Z][,estimates=K]   "a little is enough" (Baruch et al. 2019): send global + mu - Z x sigma,
                               mu and sigma the coordinate-wise mean and standard deviation of
                               honest deltas, Z = 1 by default

In the paper, ALIE's colluding attackers pool the honest updates they computed on their own data;
benchmarks/robustness.py does exactly that (`alie_state` over the attackers' honest models). A
lone `fedlink client` has only its own data, so it estimates mu and sigma from K (default 4)
honest models trained on bootstrap resamples of it: same attack, a noisier estimate.
"""

from __future__ import annotations

import math
import statistics
from abc import ABC
from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset, Subset

from fedlink.common.errors import ConfigError
from fedlink.common.tasks.base import (
    ClientData,
    ExampleDataset,
    TaskModule,
    TrainConfig,
    TrainResult,
)
from fedlink.common.tensors import StateDict

NUM_CLASSES = 10  # label flipping maps y -> NUM_CLASSES - 1 - y
DEFAULT_SIGMA = 200.0
DEFAULT_Z = 1.0
DEFAULT_ESTIMATES = 4

_SPEC_HELP = (
    'use "sign-flip", "scaling[,factor=<F>]", "gaussian[,sigma=<S>]", "label-flip" or '
    '"alie[,z=<Z>][,estimates=<K>]"'
)


class FlippedLabels(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """`dataset` with every label y replaced by 9 - y."""

    def __init__(self, dataset: ExampleDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]  # tasks' data sets are sized

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        features, label = self.dataset[index]
        return features, NUM_CLASSES - 1 - label


def flip_labels(data: ClientData) -> ClientData:
    return ClientData(train=FlippedLabels(data.train), test=data.test)


def snapshot(model: torch.nn.Module) -> StateDict:
    """A detached copy of the model's state (the global model, before local training)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def alie_state(
    global_state: Mapping[str, torch.Tensor],
    honest_states: Sequence[Mapping[str, torch.Tensor]],
    z: float,
) -> StateDict:
    """global + mean - z x std of the honest deltas, coordinate by coordinate (integer tensors are
    taken from the first honest model)."""
    if len(honest_states) < 2:
        raise ConfigError("ALIE needs at least two honest models to estimate a spread")
    out: StateDict = {}
    for name, base in global_state.items():
        if not base.dtype.is_floating_point:
            out[name] = honest_states[0][name].clone()
            continue
        deltas = torch.stack([state[name].float() - base.float() for state in honest_states])
        std, mean = torch.std_mean(deltas, dim=0)
        out[name] = (base.float() + mean - z * std).to(base.dtype)
    return out


def alie_z(num_clients: int, num_attackers: int) -> float:
    """The largest z that still hides in the honest spread (Baruch et al. 2019, z_max)."""
    supporters = math.floor(num_clients / 2 + 1) - num_attackers
    return statistics.NormalDist().inv_cdf(1 - supporters / num_clients)


class Attack(ABC):
    """Train as the task does (on possibly poisoned data), then replace the trained model."""

    name: str

    def train(
        self,
        task: TaskModule,
        model: torch.nn.Module,
        data: ClientData,
        config: TrainConfig,
        device: torch.device,
    ) -> TrainResult:
        global_state = snapshot(model)
        result = task.train(model, self.poison_data(data), config, device)
        poisoned = self.poison(global_state, snapshot(model), config.seed)
        model.load_state_dict(poisoned)
        return result

    def poison_data(self, data: ClientData) -> ClientData:
        return data

    def poison(self, global_state: StateDict, local: StateDict, seed: int) -> StateDict:
        """The model to send instead of `local`, which was trained from `global_state`."""
        return local


def _with_delta(global_state: StateDict, local: StateDict, factor: float) -> StateDict:
    """global + factor x (local - global) for floating tensors; integer tensors as trained."""
    return {
        name: global_state[name] + factor * (tensor - global_state[name])
        if tensor.dtype.is_floating_point
        else tensor
        for name, tensor in local.items()
    }


class SignFlip(Attack):
    name = "sign-flip"

    def poison(self, global_state: StateDict, local: StateDict, seed: int) -> StateDict:
        return _with_delta(global_state, local, -1.0)


class Scaling(Attack):
    name = "scaling"

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def poison_data(self, data: ClientData) -> ClientData:
        return flip_labels(data)

    def poison(self, global_state: StateDict, local: StateDict, seed: int) -> StateDict:
        return _with_delta(global_state, local, self.factor)


class GaussianNoise(Attack):
    name = "gaussian"

    def __init__(self, sigma: float) -> None:
        self.sigma = sigma

    def poison(self, global_state: StateDict, local: StateDict, seed: int) -> StateDict:
        generator = torch.Generator().manual_seed(seed)
        out: StateDict = {}
        for name, tensor in local.items():
            if tensor.dtype.is_floating_point:
                noise = torch.randn(tensor.shape, generator=generator).to(tensor.device)
                out[name] = (global_state[name].float() + self.sigma * noise).to(tensor.dtype)
            else:
                out[name] = tensor
        return out


class LabelFlip(Attack):
    name = "label-flip"

    def poison_data(self, data: ClientData) -> ClientData:
        return flip_labels(data)


class ALIE(Attack):
    """A lone client's ALIE: mu and sigma from models trained on bootstrap resamples of its data."""

    name = "alie"

    def __init__(self, z: float, estimates: int) -> None:
        self.z = z
        self.estimates = estimates

    def train(
        self,
        task: TaskModule,
        model: torch.nn.Module,
        data: ClientData,
        config: TrainConfig,
        device: torch.device,
    ) -> TrainResult:
        global_state = snapshot(model)
        size = len(data.train)  # type: ignore[arg-type]  # tasks' data sets are sized
        generator = torch.Generator().manual_seed(config.seed)
        honest: list[StateDict] = []
        losses: list[float] = []
        for _ in range(self.estimates):
            model.load_state_dict(global_state)
            resample = torch.randint(size, (size,), generator=generator).tolist()
            result = task.train(
                model, ClientData(train=Subset(data.train, resample)), config, device
            )
            honest.append(snapshot(model))
            losses.append(result.loss)
        model.load_state_dict(alie_state(global_state, honest, self.z))
        return TrainResult(num_examples=size, loss=sum(losses) / len(losses))


def parse_attack(spec: str, num_clients: int) -> Attack:
    """An attack from a spec such as "gaussian,sigma=200"; `num_clients` is scaling's default."""
    name, *params = (part.strip() for part in spec.strip().split(","))
    values: dict[str, float] = {}
    allowed: dict[str, set[str]] = {
        "sign-flip": set(),
        "scaling": {"factor"},
        "gaussian": {"sigma"},
        "label-flip": set(),
        "alie": {"z", "estimates"},
    }
    if name not in allowed:
        raise ConfigError(f"unknown attack {name!r}; {_SPEC_HELP}")
    for param in params:
        key, sep, value = param.partition("=")
        if not sep or key not in allowed[name] or key in values:
            raise ConfigError(
                f"bad attack {spec!r}: {name} takes {sorted(allowed[name])}; {_SPEC_HELP}"
            )
        try:
            values[key] = float(value)
        except ValueError:
            raise ConfigError(f"bad attack {spec!r}: {key} must be a number") from None
        if not math.isfinite(values[key]):
            raise ConfigError(f"bad attack {spec!r}: {key} must be finite")
    if name == "sign-flip":
        return SignFlip()
    if name == "scaling":
        factor = values.get("factor", float(num_clients))
        if factor <= 1:
            raise ConfigError(
                f"scaling factor must be > 1, got {factor}; with one data partition give it "
                "explicitly, e.g. scaling,factor=10 for 10 clients"
            )
        return Scaling(factor)
    if name == "gaussian":
        sigma = values.get("sigma", DEFAULT_SIGMA)
        if sigma <= 0:
            raise ConfigError(f"gaussian sigma must be positive, got {sigma}")
        return GaussianNoise(sigma)
    if name == "label-flip":
        return LabelFlip()
    estimates = values.get("estimates", DEFAULT_ESTIMATES)
    if estimates < 2 or estimates != int(estimates):
        raise ConfigError(f"alie estimates must be an integer >= 2, got {estimates}")
    return ALIE(values.get("z", DEFAULT_Z), int(estimates))
