"""A test task with a 100-million-parameter model whose "training" adds STEP to every weight, so
the coordinator's result after one round is exactly predictable. BIG_MODEL_WIDTH makes it smaller
(10 layers of WIDTH x WIDTH) for tests that only need uploads that take a while."""

from __future__ import annotations

import os

import torch
from torch import nn

from fedlink.common.tasks.base import (
    ClientData,
    DataRequest,
    EvalResult,
    ExampleDataset,
    TensorExamples,
    TrainConfig,
    TrainResult,
)

WIDTH = int(os.environ.get("BIG_MODEL_WIDTH", "3162"))  # 3162: 100,014,060 parameters
LAYERS = 10
# As large as the weights themselves (uniform in +-0.01): a big step for training, yet well within
# the coordinator's bound on how far an update may move the model (max_update_norm_ratio).
STEP = 0.01


def build_model() -> nn.Module:
    with torch.no_grad():
        model = nn.Sequential(*(nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)))
        for parameter in model.parameters():
            parameter.uniform_(-0.01, 0.01)
    return model


def load_data(request: DataRequest) -> ClientData:
    return ClientData(train=TensorExamples(torch.zeros(3, WIDTH), torch.zeros(3)))


def load_test_data() -> ExampleDataset | None:
    return None


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(STEP)
    return TrainResult(num_examples=1, loss=0.0)  # weight 1: the average is exactly this update


def evaluate(model: nn.Module, dataset: ExampleDataset, device: torch.device) -> EvalResult:
    return EvalResult(num_examples=3, loss=0.0, accuracy=0.0)
