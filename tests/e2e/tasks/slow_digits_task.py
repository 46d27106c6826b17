"""The built-in digits task, except that local training takes SLOW_TRAIN_SECONDS longer (a site
with a slow machine or a long local epoch)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from fedlink.common.tasks.base import ClientData, TrainConfig, TrainResult
from fedlink.common.tasks.digits import build_model, evaluate, load_data, load_test_data
from fedlink.common.tasks.digits import train as train_digits

__all__ = ["build_model", "evaluate", "load_data", "load_test_data", "train"]


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    time.sleep(float(os.environ.get("SLOW_TRAIN_SECONDS", "0")))
    return train_digits(model, data, config, device)
