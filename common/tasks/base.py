"""The task contract: what a federation's model-and-data module must provide.

A task is a plain Python module (built in, or any importable `package.module`) with:

    build_model() -> torch.nn.Module
    load_data(request: DataRequest) -> ClientData
    load_test_data(data_dir) -> Dataset | None  # the coordinator's test set; or load_test_data()
    train(model, data, config, device) -> TrainResult
    evaluate(model, dataset, device[, task_config]) -> EvalResult

and optionally, for metrics that cannot be averaged over clients (docs/tasks.md#metrics):

    NOT_AVERAGED: Collection[str]                 # metric names or fnmatch patterns
    aggregate_metrics(results) -> Mapping[str, float]

`train` and `evaluate` usually delegate to `fedlink.common.tasks.training`, which implements the
standard supervised loops; a task overrides them only when it trains differently. Tasks written
for the first contract (`load_test_data()`, `evaluate` without `task_config`, loss and accuracy
only) keep working: `fedlink.common.tasks.contract` calls each function the way it is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.data import Dataset

from fedlink.common.accounting import MechanismStep
from fedlink.common.errors import TaskError
from fedlink.common.task_settings import NO_SETTINGS, TaskSettings

# A dataset of (features, label) pairs; labels are int64 class indices, or floating targets for
# regression.
ExampleDataset = Dataset[tuple[torch.Tensor, torch.Tensor]]

# Local optimizers the coordinator may ask for (`optimizer`); `train_supervised` builds them.
OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class DataRequest:
    """Which slice of data this client trains on.

    `data_dir` says where the data comes from: a real site's own files, or a local copy of a data
    set that would otherwise be downloaded; None means the task's default source. That data is
    split into `num_partitions` parts by `partition` ("iid", "dirichlet:<alpha>", "classes:<k>"),
    deterministically from `seed`, and part `partition_index` is returned; the defaults (one
    partition) give a real site all of its own data.
    """

    partition: str = "iid"
    partition_index: int = 0
    num_partitions: int = 1
    seed: int = 0
    data_dir: Path | None = None


class TensorExamples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """In-memory examples: `features[i]` with label `labels[i]`: a class index (int64) for
    integer labels, kept as they are for floating ones (regression targets)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        if len(features) != len(labels):
            raise TaskError(f"{len(features)} feature rows but {len(labels)} labels")
        self.features = features
        self.labels = labels if labels.is_floating_point() else labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]


@dataclass(frozen=True)
class ClientData:
    """A client's local data: a training split and an optional local evaluation split."""

    train: ExampleDataset
    test: ExampleDataset | None = None


@dataclass(frozen=True)
class DPSGDConfig:
    """Record-level DP-SGD (docs/privacy.md): each example's gradient clipped to L2 norm
    `max_grad_norm` C, N(0, (z C)^2) noise on every batch's sum of clipped gradients (z =
    `noise_multiplier`), batches drawn by Poisson sampling; epsilon is reported at `delta`."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        # Written as "not > 0" so that NaN is refused too.
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"the DP-SGD noise multiplier must be positive and finite, got "
                f"{self.noise_multiplier}"
            )
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(
                f"the DP-SGD max_grad_norm must be positive and finite, got {self.max_grad_norm}"
            )
        if not 0 < self.delta < 1:
            raise ValueError(f"the DP-SGD delta must be in (0, 1), got {self.delta}")


@dataclass
class ControlCorrection:
    """SCAFFOLD's correction c - c_i for each trained parameter (by its state_dict name), and
    `steps`: the local optimizer steps it was added to (K), counted by
    `training.add_control_correction`; the client needs K to update its control variate."""

    correction: Mapping[str, torch.Tensor]
    steps: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters, sent by the coordinator for every round."""

    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    seed: int = 0
    dpsgd: DPSGDConfig | None = None  # None: ordinary, non-private training
    optimizer: str = "sgd"  # one of OPTIMIZERS
    # The federation's task-specific settings ([task_config] on the coordinator).
    task_config: TaskSettings = field(default_factory=lambda: NO_SETTINGS)
    # FedProx's proximal term mu (0: none): a task's training loop adds mu (w - w_global) to
    # every gradient, as `train_supervised` does (`training.add_proximal_term`).
    proximal_mu: float = 0.0
    # SCAFFOLD (None: not running): the correction c - c_i a task's training loop adds to every
    # gradient, counting its steps, as `train_supervised` does (`training.add_control_correction`).
    scaffold: ControlCorrection | None = None


@dataclass(frozen=True)
class TrainResult:
    num_examples: int
    loss: float
    # With DP-SGD: the mechanism this round ran (z, sampling rate q, local steps), which the
    # client's accountant composes with its earlier rounds.
    dpsgd: MechanismStep | None = None


@dataclass(frozen=True)
class EvalResult:
    """An evaluation: `loss`, `accuracy` (None for tasks without one, such as regression) and
    any other named metrics. The coordinator averages each over clients, weighted by
    `num_examples`, unless the task says otherwise (NOT_AVERAGED, aggregate_metrics)."""

    num_examples: int
    loss: float
    accuracy: float | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)


class TaskModule(Protocol):
    """Static type of a loaded task module. `load_test_data` and `evaluate` have two accepted
    forms each: call them through `fedlink.common.tasks.contract`."""

    load_test_data: Callable[..., ExampleDataset | None]  # (data_dir) or ()
    evaluate: Callable[..., EvalResult]  # (model, dataset, device[, task_config])

    def build_model(self) -> torch.nn.Module: ...

    def load_data(self, request: DataRequest) -> ClientData: ...

    def train(
        self, model: torch.nn.Module, data: ClientData, config: TrainConfig, device: torch.device
    ) -> TrainResult: ...
