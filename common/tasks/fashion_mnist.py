"""Built-in task: the FedAvg-paper CNN (as `mnist`) on Fashion-MNIST (Xiao et al. 2017).

Real data without a download: Debian's `dataset-fashion-mnist` package (`apt-get install
dataset-fashion-mnist`) puts the four original IDX files in /usr/share/datasets/fashion-mnist,
which is where this task looks first. `--data-dir DIR` reads them from DIR instead (the `.gz`
files or their uncompressed copies, directly in DIR or in torchvision's DIR/FashionMNIST/raw).
With neither, torchvision downloads them into ~/.cache/fedlink/fashion-mnist. Clients partition
the 60,000 training images; the 10,000 test images are the coordinator's test set.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from numpy.typing import NDArray
from torch import nn

from fedlink.common.errors import DataUnavailableError, TaskError
from fedlink.common.partition import client_split
from fedlink.common.tasks.base import (
    ClientData,
    DataRequest,
    ExampleDataset,
)
from fedlink.common.tasks.data_cache import cached_until_changed
from fedlink.common.tasks.mnist import (  # the same images, network and loops as MNIST
    FedAvgCNN,
    download_failure_reason,
    evaluate,
    image_examples,
    train,
)

__all__ = ["build_model", "evaluate", "load_data", "load_test_data", "train"]

# Where Debian's dataset-fashion-mnist package installs the files (`dpkg -L`).
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_ROOT = Path.home() / ".cache" / "fedlink" / "fashion-mnist"
IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MEAN, STD = 0.2860, 0.3530  # of the Fashion-MNIST training pixels
# IDX magic numbers: unsigned bytes, three dimensions (images) or one (labels).
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


def build_model() -> nn.Module:
    return FedAvgCNN()


def load_data(request: DataRequest) -> ClientData:
    """This client's part of the 60,000 training images."""
    images, labels = load_images(request.data_dir, train=True)
    train_idx, test_idx = client_split(labels.numpy(), request)
    return ClientData(
        train=image_examples(images, labels, train_idx, MEAN, STD),
        test=None if test_idx is None else image_examples(images, labels, test_idx, MEAN, STD),
    )


def load_test_data(data_dir: Path | None = None) -> ExampleDataset:
    """The 10,000 test images."""
    images, labels = load_images(data_dir, train=False)
    return image_examples(images, labels, np.arange(len(labels)), MEAN, STD)


@cached_until_changed  # one copy however many clients a process serves
def load_images(data_dir: Path | None, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N, 28, 28), int64 labels (N,)) from `data_dir`, the Debian package, or a
    download, in that order."""
    if data_dir is not None:
        root = Path(data_dir)
        for folder in (root, root / "FashionMNIST" / "raw"):
            if _find(folder, IDX_FILES[train][0]) is not None:
                return _read_pair(folder, train)
        raise DataUnavailableError(
            f"no Fashion-MNIST in {root}: expected {' and '.join(IDX_FILES[train])} (.gz or not) in "
            f"{root} or {root}/FashionMNIST/raw; `apt-get install dataset-fashion-mnist` puts them "
            f"in {SYSTEM_DIR}"
        )
    if _find(SYSTEM_DIR, IDX_FILES[train][0]) is not None:
        return _read_pair(SYSTEM_DIR, train)
    try:
        dataset: Any = torchvision.datasets.FashionMNIST(DEFAULT_ROOT, train=train, download=True)
    except (OSError, RuntimeError) as error:
        reason = download_failure_reason(error)
        raise DataUnavailableError(
            f"Fashion-MNIST is neither installed in {SYSTEM_DIR} nor in {DEFAULT_ROOT}, and "
            f"could not be downloaded ({reason}). On Debian or Ubuntu run "
            "`apt-get install dataset-fashion-mnist`; elsewhere copy the four *-ubyte.gz files "
            "to a folder and pass --data-dir DIR"
        ) from error
    return dataset.data, dataset.targets.long()


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _read_pair(folder: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images_name, labels_name = IDX_FILES[train]
    images = _read_idx(folder, images_name, _IMAGES_MAGIC)
    labels = _read_idx(folder, labels_name, _LABELS_MAGIC)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(labels) != len(images):
        raise TaskError(
            f"{folder}: {images_name} holds {images.shape} and {labels_name} {labels.shape}; "
            "expected (N, 28, 28) images and N labels"
        )
    if labels.max(initial=0) > 9:
        raise TaskError(f"{folder}: {labels_name} has labels outside 0..9")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _read_idx(folder: Path, name: str, magic: int) -> NDArray[np.uint8]:
    """An IDX file of unsigned bytes (LeCun's MNIST format): big-endian magic, dimension sizes,
    then the bytes. Plain bytes only: nothing in the file is interpreted as code."""
    path = _find(folder, name)
    if path is None:
        raise DataUnavailableError(f"{folder}: {name}(.gz) is missing")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise TaskError(f"cannot read {path}: {error}") from error
    dims = magic & 0xFF
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != magic:
        raise TaskError(f"{path} is not an IDX file of unsigned bytes with {dims} dimension(s)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if len(raw) - header != int(np.prod(shape)):
        raise TaskError(f"{path}: header says {shape} but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
