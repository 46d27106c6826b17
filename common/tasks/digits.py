"""Built-in task: an MLP on scikit-learn's bundled 8x8 digits (1,797 images, no download).

Small enough to train a federation in seconds on a laptop, so it drives demos and tests. A fixed,
seeded 80/20 split keeps 20% as the coordinator's test set; clients partition the other 80%.
A real site can supply its own data as `<data_dir>/digits.npz` (see docs/tasks.md).
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fedlink.common.errors import TaskError
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

NUM_FEATURES = 64
NUM_CLASSES = 10
MAX_PIXEL = 16.0  # load_digits' pixels are counts 0..16
DATA_FILE = "digits.npz"
_SPLIT_SEED = 0  # fixed: every client and the coordinator must agree on the test split


class DigitsMLP(nn.Module):
    """64 -> 128 -> 10 fully connected network."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(NUM_FEATURES, 128)
        self.fc2 = nn.Linear(128, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.fc2(F.relu(self.fc1(x)))
        return logits


def build_model() -> nn.Module:
    return DigitsMLP()


def load_data(request: DataRequest) -> ClientData:
    """This client's part of the bundled training split, or of `<data_dir>/digits.npz`."""
    if request.data_dir is None:
        x, y, _, _ = _bundled_split()
    else:
        x, y = _read_site_file(Path(request.data_dir) / DATA_FILE)
    train_idx, test_idx = client_split(y, request)
    return ClientData(
        train=_examples(x[train_idx], y[train_idx]),
        test=None if test_idx is None else _examples(x[test_idx], y[test_idx]),
    )


def load_test_data() -> ExampleDataset:
    """The 20% of the bundled digits that no client trains on."""
    _, _, x, y = _bundled_split()
    return _examples(x, y)


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    return train_classifier(model, data, config, device)


def evaluate(model: nn.Module, dataset: ExampleDataset, device: torch.device) -> EvalResult:
    return evaluate_classifier(model, dataset, device)


@functools.lru_cache(maxsize=2)  # one copy however many clients a process serves
def _bundled_split() -> tuple[
    NDArray[np.float32], NDArray[np.int64], NDArray[np.float32], NDArray[np.int64]
]:
    """(train x, train y, test x, test y) from scikit-learn's copy, stratified and seeded."""
    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32) / MAX_PIXEL
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=_SPLIT_SEED, stratify=y
    )
    return x_train, y_train, x_test, y_test


def _read_site_file(path: Path) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
    """Load and validate a site's digits.npz: `x` (N, 64) pixels 0..16, `y` (N,) labels 0..9."""
    expected = (
        f"expected {DATA_FILE} with arrays x (N, {NUM_FEATURES}) of pixel values 0..16 and "
        f"y (N,) of integer labels 0..{NUM_CLASSES - 1}, as numpy.savez writes them"
    )
    if not path.is_file():
        raise TaskError(f"{path} not found; {expected}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not {"x", "y"} <= set(archive.files):
                raise TaskError(f"{path} has arrays {sorted(archive.files)}; {expected}")
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise TaskError(f"cannot read {path} ({error}); {expected}") from error
    if x.ndim != 2 or x.shape[1] != NUM_FEATURES or not np.issubdtype(x.dtype, np.number):
        raise TaskError(f"{path}: x has shape {x.shape} and dtype {x.dtype}; {expected}")
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise TaskError(f"{path}: y has shape {y.shape} and dtype {y.dtype}; {expected}")
    if len(x) == 0:
        raise TaskError(f"{path} holds no examples; {expected}")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > MAX_PIXEL:
        raise TaskError(f"{path}: x has values outside 0..16; {expected}")
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise TaskError(f"{path}: y has labels outside 0..{NUM_CLASSES - 1}; {expected}")
    return x.astype(np.float32) / MAX_PIXEL, y.astype(np.int64)


def _examples(x: NDArray[np.float32], y: NDArray[np.int64]) -> TensorExamples:
    return TensorExamples(torch.from_numpy(x), torch.from_numpy(y))
