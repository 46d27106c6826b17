"""Built-in task: a small CNN on CIFAR-10 (see cifar10_resnet18 for ResNet-18 on the same data).

The model is the one from PyTorch's "Training a classifier" tutorial (62,006 parameters): quick to
train on a CPU, so a federation shows progress within minutes. The data comes through
torchvision, downloaded on first use into ~/.cache/fedlink/cifar10, or read from `--data-dir` on
machines without internet access. Clients partition the 50,000 training images; the 10,000 test
images are the coordinator's test set. No augmentation: images are only normalised.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from numpy.typing import NDArray
from torch import nn

from fedlink.common.errors import DataUnavailableError
from fedlink.common.partition import client_split
from fedlink.common.tasks.base import (
    ClientData,
    DataRequest,
    EvalResult,
    ExampleDataset,
    TensorExamples,
    TrainConfig,
    TrainResult,
)
from fedlink.common.tasks.training import evaluate_classifier, train_classifier

DEFAULT_ROOT = Path.home() / ".cache" / "fedlink" / "cifar10"
# Per-channel mean and standard deviation of the CIFAR-10 training images.
_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class TutorialCNN(nn.Module):
    """conv5x5(6) - pool - conv5x5(16) - pool - fc 400->120 - fc 120->84 - fc 84->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, kernel_size=5)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        logits: torch.Tensor = self.fc3(x)
        return logits


def build_model() -> nn.Module:
    return TutorialCNN()


def load_data(request: DataRequest) -> ClientData:
    """This client's part of the CIFAR-10 training images."""
    images, labels = _load(request.data_dir, train=True)
    train_idx, test_idx = client_split(labels, request)
    return ClientData(
        train=_examples(images, labels, train_idx),
        test=None if test_idx is None else _examples(images, labels, test_idx),
    )


def load_test_data(data_dir: Path | None = None) -> ExampleDataset:
    """The 10,000 CIFAR-10 test images, from `data_dir` (the coordinator's test_data_dir) or the
    default location."""
    images, labels = _load(data_dir, train=False)
    return _examples(images, labels, np.arange(len(labels)))


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    return train_classifier(model, data, config, device)


def evaluate(model: nn.Module, dataset: ExampleDataset, device: torch.device) -> EvalResult:
    return evaluate_classifier(model, dataset, device)


def _load(data_dir: Path | None, *, train: bool) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """(uint8 images (N, 32, 32, 3), int64 labels (N,)), downloading them if they are missing."""
    root = Path(data_dir) if data_dir is not None else DEFAULT_ROOT
    try:
        dataset: Any = torchvision.datasets.CIFAR10(root, train=train, download=True)
    except (OSError, RuntimeError) as error:
        raise DataUnavailableError(_unavailable_message(root, error)) from error
    return np.asarray(dataset.data, dtype=np.uint8), np.asarray(dataset.targets, dtype=np.int64)


def _unavailable_message(root: Path, error: Exception) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    reason = lines[-1].strip() if lines else type(error).__name__
    return (
        f"CIFAR-10 is not in {root} and could not be downloaded ({reason}); this machine seems "
        "to have no internet access. On a machine that has, run\n"
        "    python -c \"import torchvision; torchvision.datasets.CIFAR10('cifar10', "
        'download=True)"\n'
        f"then copy the folder cifar10/cifar-10-batches-py to {root}/, or to DIR/ and pass "
        "--data-dir DIR (DIR/cifar-10-batches-py must hold data_batch_1..5, test_batch and "
        "batches.meta)."
    )


def _examples(
    images: NDArray[np.uint8], labels: NDArray[np.int64], indices: NDArray[np.int64]
) -> TensorExamples:
    pixels = torch.from_numpy(images[indices]).permute(0, 3, 1, 2).float() / 255
    return TensorExamples((pixels - _MEAN) / _STD, torch.from_numpy(labels[indices]))
