"""Built-in task: torchvision's ResNet-18 (11.2M parameters) on CIFAR-10.

Same data, partitions and training loop as the `cifar10` task; only the model differs. This is
the ImageNet architecture unchanged (7x7 stem, max pooling), as torchvision ships it.
"""

from __future__ import annotations

import torchvision
from torch import nn

from fedlink.common.tasks.cifar10 import evaluate, load_data, load_test_data, train

__all__ = ["build_model", "evaluate", "load_data", "load_test_data", "train"]


def build_model() -> nn.Module:
    model: nn.Module = torchvision.models.resnet18(num_classes=10)
    return model
