"""What a virtual client does with a task: exactly what `fedlink client` does with it.

A `ClientRunner` holds one task module and one model instance and serves any virtual client
with them: it cuts that client's part of the data (the task's `load_data`, as a real client
with `--partition`), loads the global model it was sent, trains with the coordinator's settings
and the round's seed (the same `TrainConfig` a real client builds), and hands back the trained
model as safetensors bytes, or evaluates. Nothing of a client stays in the runner between
tasks, so memory is one model per runner, whatever the number of clients. What a client must
keep between rounds (SCAFFOLD's control variate c_i) is kept on disk, one file per client in
`ClientSettings.state_dir`, as `fedlink client --state-dir` keeps it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from fedlink.client.settings import runs_scaffold, train_config_from
from fedlink.common.scaffold import (
    CONTROL_DELTA,
    SERVER_CONTROL,
    control_correction,
    next_client_control,
    read_client_control,
    split_control,
)
from fedlink.common.task_settings import SettingValue
from fedlink.common.tasks import load_task
from fedlink.common.tasks.base import ClientData, DataRequest, TrainConfig
from fedlink.common.tasks.contract import evaluate
from fedlink.common.tasks.training import make_optimizer
from fedlink.common.tensors import StateDict, encode_state, open_state_file, save_state_file


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
    # Where each virtual client keeps what it carries between rounds (SCAFFOLD's c_i).
    state_dir: Path | None = None


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
        scaffold = work.train and runs_scaffold(settings.task_config)
        if isinstance(work.model, Path):
            with open_state_file(work.model) as state:
                server = self._load(state, scaffold)
        else:
            server = self._load(safetensors.torch.load(work.model), scaffold)
        if not work.train:
            dataset = data.test if data.test is not None else data.train
            result = evaluate(self._task, self._model, dataset, self._device, settings.task_config)
            return ClientResult(work.identity, result.num_examples, dict(result.metrics), None)
        config = train_config_from(
            settings.hyperparameters, seed=work.seed, settings=settings.task_config
        )
        torch.manual_seed(work.seed)
        if not scaffold:
            trained = self._task.train(self._model, data, config, self._device)
            update = encode_state(self._model.state_dict())
            return ClientResult(work.identity, trained.num_examples, {"loss": trained.loss}, update)
        # SCAFFOLD, as FederationClient trains it: c_i from this client's file (0 at first).
        assert settings.state_dir is not None, "a SCAFFOLD simulation keeps c_i on disk"
        stored = settings.state_dir / f"scaffold-control-{work.identity}.safetensors"
        client = read_client_control(stored, server) or {
            name: torch.zeros_like(c) for name, c in server.items()
        }
        start = {name: t.detach().clone() for name, t in self._model.state_dict().items()}
        control = control_correction(self._model, server, client)
        config = dataclasses.replace(config, scaffold=control)
        trained = self._task.train(self._model, data, config, self._device)
        state = self._model.state_dict()
        new, delta = next_client_control(
            client=client,
            server=server,
            start=start,
            trained=state,
            steps=control.steps,
            learning_rate=config.learning_rate,
            stepped=frozenset(control.correction),
        )
        # Kept at once: a virtual client's result goes to the engine's intake in process.
        stored.parent.mkdir(parents=True, exist_ok=True)
        save_state_file(new, stored, durable=False)
        extra = {CONTROL_DELTA + name: tensor for name, tensor in delta.items()}
        update = encode_state({**state, **extra})
        return ClientResult(work.identity, trained.num_examples, {"loss": trained.loss}, update)

    def _load(self, state: Mapping[str, torch.Tensor], scaffold: bool) -> StateDict:
        """Load the global model from a task payload; SCAFFOLD's c (copied) when `scaffold`."""
        model, server = split_control(state, SERVER_CONTROL) if scaffold else (state, {})
        self._model.load_state_dict(model)
        return {name: tensor.clone() for name, tensor in server.items()}
