"""Built-in task: regression on scikit-learn's bundled diabetes data (442 patients, no download).

Ten baseline measurements (age, sex, BMI, blood pressure, six blood serum values) predict a
measure of disease progression one year later. The model is a small MLP trained with mean
squared error; evaluation reports MSE (the loss), MAE and R², R² being combined over clients
from averageable statistics (see `aggregate_metrics`). Features and targets are standardized
with the whole data set's constants, so MSE is in units of the target's variance (R² = 1 - MSE
for the whole data set). A fixed, seeded 80/20 split keeps 20% as the coordinator's test set;
clients partition the other 80%. A real site can supply `<data_dir>/diabetes.npz` instead.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from sklearn.datasets import load_diabetes
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
from fedlink.common.tasks.training import evaluate_regressor, r2_from_means, train_regressor

NUM_FEATURES = 10
DATA_FILE = "diabetes.npz"
# Progression scores of the bundled data: mean and standard deviation (for standardizing).
TARGET_MEAN, TARGET_STD = 152.133, 77.006
_SPLIT_SEED = 0  # fixed: every client and the coordinator must agree on the test split
# R² is 1 - MSE / Var(y): a ratio, not a mean, so averaging the clients' own R² would be wrong.
# It is computed from the averaged MSE and target moments instead (`aggregate_metrics`); the
# moments are statistics, not results, and stay out of metrics.jsonl.
NOT_AVERAGED = ("r2", "target_mean", "target_square_mean")


class DiabetesMLP(nn.Module):
    """10 -> 32 -> 1 fully connected network."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(NUM_FEATURES, 32)
        self.fc2 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prediction: torch.Tensor = self.fc2(F.relu(self.fc1(x))).squeeze(-1)
        return prediction


def build_model() -> nn.Module:
    return DiabetesMLP()


def load_data(request: DataRequest) -> ClientData:
    """This client's part of the bundled training split, or of `<data_dir>/diabetes.npz`."""
    if request.data_dir is None:
        x, y, _, _ = _bundled_split()
    else:
        x, y = _read_site_file(Path(request.data_dir) / DATA_FILE)
    train_idx, test_idx = client_split(_strata(y), request)
    return ClientData(
        train=_examples(x[train_idx], y[train_idx]),
        test=None if test_idx is None else _examples(x[test_idx], y[test_idx]),
    )


def load_test_data(data_dir: Path | None = None) -> ExampleDataset:
    """The 20% of the bundled data no client trains on, or `<data_dir>/diabetes.npz`."""
    if data_dir is not None:
        return _examples(*_read_site_file(Path(data_dir) / DATA_FILE))
    _, _, x, y = _bundled_split()
    return _examples(x, y)


def train(
    model: nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    return train_regressor(model, data, config, device)


def evaluate(model: nn.Module, dataset: ExampleDataset, device: torch.device) -> EvalResult:
    return evaluate_regressor(model, dataset, device)


def aggregate_metrics(results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """R² of the federation: from the example-weighted means of MSE and the target moments,
    which is exactly R² over the union of the clients' data."""
    needed = ("mse", "target_mean", "target_square_mean")
    usable = [(n, m) for n, m in results if all(k in m for k in needed)]
    total = sum(n for n, _ in usable)
    if not total:
        return {}
    means = {k: sum(n * m[k] for n, m in usable) / total for k in needed}
    return {"r2": r2_from_means(means)}


def _bundled_split() -> tuple[
    NDArray[np.float32], NDArray[np.float32], NDArray[np.float32], NDArray[np.float32]
]:
    """(train x, train y, test x, test y) from scikit-learn's copy, standardized and seeded."""
    data = load_diabetes()
    x = np.asarray(data.data, dtype=np.float64)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    y = (np.asarray(data.target, dtype=np.float64) - TARGET_MEAN) / TARGET_STD
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y.astype(np.float32), test_size=0.2, random_state=_SPLIT_SEED
    )
    return x_train, y_train, x_test, y_test


def _read_site_file(path: Path) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """A site's diabetes.npz: `x` (N, 10) standardized features, `y` (N,) standardized targets."""
    expected = (
        f"expected {DATA_FILE} with arrays x (N, {NUM_FEATURES}) of standardized features and "
        "y (N,) of standardized targets, as numpy.savez writes them"
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
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.number):
        raise TaskError(f"{path}: y has shape {y.shape} and dtype {y.dtype}; {expected}")
    if len(x) == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise TaskError(f"{path} holds no examples or non-finite values; {expected}")
    return x.astype(np.float32), y.astype(np.float32)


def _strata(y: NDArray[np.float32]) -> NDArray[np.int64]:
    """Quartiles of the target as class labels, so the label-skew partitions
    (dirichlet, classes) have classes to skew."""
    edges = np.quantile(y, [0.25, 0.5, 0.75])
    return np.searchsorted(edges, y).astype(np.int64)


def _examples(x: NDArray[np.float32], y: NDArray[np.float32]) -> TensorExamples:
    return TensorExamples(torch.from_numpy(x), torch.from_numpy(y))
