"""The built-in digits task with the faults of a careless site, chosen by environment:
FAULTY_TRAIN_SECONDS makes local training that much slower; FAULTY_TRAIN_ERROR makes train()
raise it; FAULTY_WIDE_OUTPUT gives the model's last layer
that many outputs instead of 10 (a site running another version of the task)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from fedlink.common.tasks.base import ClientData, TrainConfig, TrainResult
from fedlink.common.tasks.digits import build_model as build_digits
from fedlink.common.tasks.digits import evaluate, load_data, load_test_data
from fedlink.common.tasks.digits import train as train_digits

__all__ = ["build_model", "evaluate", "load_data", "load_test_data", "train"]


def build_model() -> nn.Module:
    model = build_digits()
    outputs = os.environ.get("FAULTY_WIDE_OUTPUT")
    if outputs:
        model.fc2 = nn.Linear(model.fc2.in_features, int(outputs))
    return model


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    time.sleep(float(os.environ.get("FAULTY_TRAIN_SECONDS", "0")))
    error = os.environ.get("FAULTY_TRAIN_ERROR")
    if error:
        raise RuntimeError(error)
    return train_digits(model, data, config, device)
