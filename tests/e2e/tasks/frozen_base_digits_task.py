"""The digits task on a pretrained, frozen base with a trainable head: the base is read from the
safetensors file named by FROZEN_BASE (each site's own copy of the pretrained weights). It does
not freeze the base itself: the client freezes what the federation does not exchange."""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
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
HIDDEN = 32


class FrozenBaseMLP(nn.Sequential):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(NUM_FEATURES, HIDDEN)
        self.act = nn.ReLU()
        self.head = nn.Linear(HIDDEN, NUM_CLASSES)


def build_model() -> nn.Module:
    model = FrozenBaseMLP()
    model.base.load_state_dict(safetensors.torch.load_file(Path(os.environ["FROZEN_BASE"])))
    return model
