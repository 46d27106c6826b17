"""Built-in task: the CNN of the FedAvg paper (McMahan et al. 2017) on MNIST.

The data comes through torchvision, downloaded on first use into ~/.cache/fedlink/mnist, or read
from `--data-dir` on machines without internet access. Clients partition the 60,000 training
images; the 10,000 test images are the coordinator's test set.
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
from fedlink.common.tasks.data_cache import cached_until_changed
from fedlink.common.tasks.training import evaluate_classifier, train_classifier

DEFAULT_ROOT = Path.home() / ".cache" / "fedlink" / "mnist"
_MEAN, _STD = 0.1307, 0.3081  # of the MNIST training pixels, as in pytorch/examples


class FedAvgCNN(nn.Module):
    """Two 5x5 conv layers (32, 64 channels, 'same' padding) each followed by 2x2 max pooling,
    then 3136 -> 512 -> 10; 1,663,370 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=2)
        self.fc1 = nn.Linear(7 * 7 * 64, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        logits: torch.Tensor = self.fc2(x)
        return logits


def build_model() -> nn.Module:
    return FedAvgCNN()


def load_data(request: DataRequest) -> ClientData:
    """This client's part of the MNIST training images."""
    images, labels = load_images(request.data_dir, train=True)
    train_idx, test_idx = client_split(labels.numpy(), request)
    return ClientData(
        train=image_examples(images, labels, train_idx),
        test=None if test_idx is None else image_examples(images, labels, test_idx),
    )


def load_test_data(data_dir: Path | None = None) -> ExampleDataset:
    """The 10,000 MNIST test images, from `data_dir` (the coordinator's test_data_dir) or the
    default location."""
    images, labels = load_images(data_dir, train=False)
    return image_examples(images, labels, np.arange(len(labels)))


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    return train_classifier(model, data, config, device)


def evaluate(model: nn.Module, dataset: ExampleDataset, device: torch.device) -> EvalResult:
    return evaluate_classifier(model, dataset, device)


@cached_until_changed  # one copy however many clients a process serves
def load_images(data_dir: Path | None, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 28, 28), int64 labels (N,)), downloading them if they are missing."""
    root = Path(data_dir) if data_dir is not None else DEFAULT_ROOT
    try:
        dataset: Any = torchvision.datasets.MNIST(root, train=train, download=True)
    except (OSError, RuntimeError) as error:
        raise DataUnavailableError(_unavailable_message(root, error)) from error
    return dataset.data, dataset.targets.long()


def download_failure_reason(error: Exception) -> str:
    """Why torchvision could not download a data set: the last line of its error is the cause."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def _unavailable_message(root: Path, error: Exception) -> str:
    reason = download_failure_reason(error)
    return (
        f"MNIST is not in {root} and could not be downloaded ({reason}); this machine seems to "
        "have no internet access. On a machine that has, run\n"
        "    python -c \"import torchvision; torchvision.datasets.MNIST('mnist', download=True)\"\n"
        f"then copy the folder mnist/MNIST to {root}/MNIST, or to DIR/MNIST and pass "
        "--data-dir DIR (DIR/MNIST/raw must hold the four *-ubyte files)."
    )


def image_examples(
    images: torch.Tensor,
    labels: torch.Tensor,
    indices: NDArray[np.int64],
    mean: float = _MEAN,
    std: float = _STD,
) -> TensorExamples:
    """28x28 uint8 images (MNIST and Fashion-MNIST) as normalized one-channel examples."""
    index = torch.from_numpy(indices)
    features = (images[index].float() / 255 - mean) / std
    return TensorExamples(features.unsqueeze(1), labels[index])
