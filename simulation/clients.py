"""What a virtual client does with a task: exactly what `fedlink client` does with it.

A `ClientRunner` holds one task module and one model instance and serves any virtual client
with them: it cuts that client's part of the data (the task's `load_data`, as a real client
with `--partition`), loads the global model it was sent, trains with the coordinator's settings
and the round's seed (the same `TrainConfig` a real client builds), and hands back the trained
model as safetensors bytes, or evaluates. Nothing of a client stays in the runner between
tasks, so memory is one model per runner, whatever the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from fedlink.client.app import train_config_from
from fedlink.common.task_settings import SettingValue
from fedlink.common.tasks import load_task
from fedlink.common.tasks.base import ClientData, DataRequest, TrainConfig
from fedlink.common.tasks.contract import evaluate
from fedlink.common.tasks.training import make_optimizer
from fedlink.common.tensors import encode_state, open_state_file


@dataclass(frozen=True)
class ClientSettings:
    """What every virtual client shares: the task, the coordinator's training settings (as
    a real client receives them at Join), and how the data is split."""

    task: str
    hyperparameters: Mapping[str, str]
    task_config: Mapping[str, SettingValue]
    partition: str
    num_clients: int
    seed: int
    data_dir: Path | None


@dataclass(frozen=True)
class ClientWork:
    """One task for one virtual client: train or evaluate the global model (a file on this
    machine, or its bytes when the worker may be on another)."""

    identity: str
    index: int
    train: bool
    seed: int
    model: Path | bytes


@dataclass(frozen=True)
class ClientResult:
    identity: str
    num_examples: int
    metrics: dict[str, float]
    update: bytes | None  # the trained model (safetensors); None for an evaluation


class ClientRunner:
    """One task module and one model, reused for every virtual client."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._device = torch.device("cpu")
        self._task = load_task(settings.task)
        self._model = self._task.build_model()

    def warm_up(self) -> None:
        """Do once what every client's first task would do again in each worker: read the
        task's data (a task caches its source) and build an optimizer (torch imports its
        compiler stack then, seconds). Workers forked afterwards start warm."""
        self._data(0)
        make_optimizer(self._model, TrainConfig())

    def place(self, device: torch.device) -> None:
        self._device = device
        self._model.to(device)

    def _data(self, index: int) -> ClientData:
        settings = self._settings
        return self._task.load_data(
            DataRequest(
                partition=settings.partition,
                partition_index=index,
                num_partitions=settings.num_clients,
                seed=settings.seed,
                data_dir=settings.data_dir,
            )
        )

    def run(self, work: ClientWork) -> ClientResult:
        settings = self._settings
        data = self._data(work.index)
        if isinstance(work.model, Path):
            with open_state_file(work.model) as state:
                self._model.load_state_dict(state)
        else:
            self._model.load_state_dict(safetensors.torch.load(work.model))
        if not work.train:
            dataset = data.test if data.test is not None else data.train
            result = evaluate(self._task, self._model, dataset, self._device, settings.task_config)
            return ClientResult(work.identity, result.num_examples, dict(result.metrics), None)
        config = train_config_from(
            settings.hyperparameters, seed=work.seed, settings=settings.task_config
        )
        torch.manual_seed(work.seed)
        trained = self._task.train(self._model, data, config, self._device)
        update = encode_state(self._model.state_dict())
        return ClientResult(work.identity, trained.num_examples, {"loss": trained.loss}, update)
