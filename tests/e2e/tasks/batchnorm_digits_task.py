"""The built-in digits task with a BatchNorm layer in its model, which DP-SGD cannot train."""

from __future__ import annotations

from torch import nn

from fedlink.common.tasks.digits import (
    NUM_CLASSES,
    NUM_FEATURES,
    evaluate,
    load_data,
    load_test_data,
    train,
)

__all__ = ["build_model", "evaluate", "load_data", "load_test_data", "train"]


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(NUM_FEATURES, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, NUM_CLASSES)
    )
