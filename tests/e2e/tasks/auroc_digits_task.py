"""A user task on the second contract: "is this digit `positive_digit`?" on the bundled digits,
with the digit chosen by the coordinator's [task_config] and AUROC reported as a metric the
coordinator cannot average (sufficient statistics, summed in aggregate_metrics)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from fedlink.common.errors import TaskError
from fedlink.common.task_settings import TaskSettings
from fedlink.common.tasks import digits
from fedlink.common.tasks.base import (
    ClientData,
    EvalResult,
    ExampleDataset,
    TrainConfig,
    TrainResult,
)
from fedlink.common.tasks.metrics import AUROC_STATISTICS, auroc_metric, auroc_statistics
from fedlink.common.tasks.training import evaluate_classifier, train_classifier

NOT_AVERAGED = (AUROC_STATISTICS,)


class IsDigit(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """`dataset` with label 1 for `digit` and 0 for every other."""

    def __init__(self, dataset: ExampleDataset, digit: int) -> None:
        self.dataset, self.digit = dataset, digit

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        features, label = self.dataset[index]
        return features, (label == self.digit).long()


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(digits.NUM_FEATURES, 32), nn.ReLU(), nn.Linear(32, 2))


load_data = digits.load_data


def load_test_data(data_dir: Path | None) -> ExampleDataset:
    if data_dir is not None:
        raise TaskError("this task's test set is the bundled one; unset test_data_dir")
    return digits.load_test_data()


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    digit = _positive_digit(config.task_config)
    binary = ClientData(IsDigit(data.train, digit), None)
    return train_classifier(model, binary, config, device)


def evaluate(
    model: nn.Module, dataset: ExampleDataset, device: torch.device, task_config: TaskSettings
) -> EvalResult:
    binary = IsDigit(dataset, _positive_digit(task_config))
    result = evaluate_classifier(model, binary, device)
    features = torch.stack([binary[i][0] for i in range(len(binary))]).to(device)
    labels = torch.stack([binary[i][1] for i in range(len(binary))])
    with torch.no_grad():
        scores = torch.softmax(model(features), dim=1)[:, 1]
    return EvalResult(
        result.num_examples,
        result.loss,
        result.accuracy,
        metrics=auroc_statistics(scores, labels == 1),
    )


def aggregate_metrics(results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    return auroc_metric(results)


def _positive_digit(task_config: TaskSettings) -> int:
    digit = task_config.get("positive_digit")
    if not isinstance(digit, int) or isinstance(digit, bool) or not 0 <= digit <= 9:
        raise TaskError(f"set positive_digit (0..9) in [task_config]; got {digit!r}")
    return digit
