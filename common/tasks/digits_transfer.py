"""Built-in task: federated transfer learning. A small CNN's backbone, pretrained centrally on
Fashion-MNIST, under a new head for handwritten digits, which the federation fine-tunes.

The backbone is the pretrained checkpoint (safetensors) in the file FEDLINK_TRANSFER_BACKBONE
names, on every site and on the coordinator; make it with

    python -m fedlink.common.tasks.digits_transfer --out backbone.safetensors

which trains the whole CNN on Fashion-MNIST's 60,000 training images and keeps the backbone.
With `exchanged_tensors = ["head.*"]` only the head travels; the backbone is frozen, checked by
hash at join (docs/large-models.md). Without FEDLINK_TRANSFER_BACKBONE the backbone is drawn
from a fixed seed, the same everywhere: exchanging every tensor then trains the same network from
scratch, the baseline transfer learning is measured against.

Why a variable and not `[task_config]` or a client option: the path is each site's own (like
`causal-lm`'s FEDLINK_CAUSAL_LM_MODEL), and `build_model()` runs before a client has joined,
when it has no federation settings; a coordinator that named files on the sites' disks would
gain a power it does not need. The hash check at join catches a site with another checkpoint.

The digits: scikit-learn's bundled 8x8 images (as the `digits` task splits them), scaled to
20x20 and centred in 28x28 as MNIST centres its digits; with `--data-dir DIR`, MNIST itself
(DIR/MNIST/raw, as the `mnist` task reads it). Pixels are normalised with Fashion-MNIST's
statistics, the inputs the backbone was trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from fedlink.common import partial
from fedlink.common.errors import FedlinkError, TaskError, TensorFormatError
from fedlink.common.partition import client_split
from fedlink.common.tasks import digits, fashion_mnist, mnist
from fedlink.common.tasks.base import (
    ClientData,
    DataRequest,
    ExampleDataset,
    TensorExamples,
    TrainConfig,
)
from fedlink.common.tasks.training import evaluate_classifier, train_classifier
from fedlink.common.tensors import StateDict, open_state_file, save_state_file

__all__ = ["build_model", "evaluate", "load_data", "load_test_data", "train"]

BACKBONE_ENV = "FEDLINK_TRANSFER_BACKBONE"
FEATURES = 128
NUM_CLASSES = 10
HEAD_ONLY = partial.TensorSelection(exchanged=("head.*",))
_BACKBONE_SEED = 0  # the untrained backbone: the same on every site
_DIGIT_PIXELS, _IMAGE_PIXELS = 20, 28  # MNIST centres 20x20 digits in 28x28 images


class Backbone(nn.Module):
    """Two 3x3 conv layers (16, 32 channels) each followed by 2x2 max pooling, then 1568 -> 128:
    features of a 28x28 grey image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc = nn.Linear(32 * 7 * 7, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        features: torch.Tensor = F.relu(self.fc(torch.flatten(x, 1)))
        return features


class TransferCNN(nn.Module):
    """`backbone` (205,632 parameters) and `head`, a linear classifier on its features (1,290)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_BACKBONE_SEED)
            self.backbone = Backbone()
        self.head = nn.Linear(FEATURES, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.backbone(x))
        return logits


def build_model() -> nn.Module:
    """The CNN with the pretrained backbone FEDLINK_TRANSFER_BACKBONE names, if it names one.

    Which tensors train is the federation's choice: the client freezes every tensor that does
    not travel (with `exchanged_tensors = ["head.*"]`, the backbone)."""
    model = TransferCNN()
    path = os.environ.get(BACKBONE_ENV)
    if path:
        load_backbone(model.backbone, Path(path))
    return model


def load_backbone(backbone: nn.Module, path: Path) -> None:
    """Load `backbone`'s weights from the safetensors file `path`, which must hold exactly its
    tensors, with their dtypes and shapes, and finite values (TaskError saying what is wrong)."""
    remedy = (
        f"point {BACKBONE_ENV} at the pretrained backbone the federation agreed on, made with "
        "`python -m fedlink.common.tasks.digits_transfer --out FILE`"
    )
    if not path.is_file():
        raise TaskError(f"{BACKBONE_ENV} names {path}, which is not a file; {remedy}")
    expected = backbone.state_dict()
    try:
        with open_state_file(path) as stored:
            problem = _misfit(expected, stored)
            if problem is None:
                backbone.load_state_dict(stored)
    except TensorFormatError as error:
        raise TaskError(f"{path} is not a safetensors file ({error}); {remedy}") from None
    if problem is not None:
        raise TaskError(f"{path} does not fit this task's backbone: {problem}; {remedy}")


def _misfit(expected: StateDict, stored: StateDict) -> str | None:
    """What keeps `stored` from being the backbone `expected` describes, or None."""
    for name in sorted(expected.keys() | stored.keys()):
        if name not in stored:
            return f"it has no tensor {name!r} ({list(expected[name].shape)})"
        if name not in expected:
            return f"its tensor {name!r} is not part of the backbone"
        want, got = expected[name], stored[name]
        if want.dtype != got.dtype or want.shape != got.shape:
            return (
                f"{name!r} is {str(got.dtype).removeprefix('torch.')} {list(got.shape)}, the "
                f"backbone's {str(want.dtype).removeprefix('torch.')} {list(want.shape)}"
            )
        if not bool(torch.isfinite(got).all()):
            return f"{name!r} holds values that are not finite"
    return None


def load_data(request: DataRequest) -> ClientData:
    """This client's part of the bundled digits' training split, or of MNIST's training images
    in `request.data_dir`."""
    if request.data_dir is None:
        local = digits.load_data(request)
        return ClientData(
            train=_digit_images(local.train),
            test=None if local.test is None else _digit_images(local.test),
        )
    images, labels = mnist.load_images(request.data_dir, train=True)
    train_idx, test_idx = client_split(labels.numpy(), request)
    return ClientData(
        train=_mnist_examples(images, labels, train_idx),
        test=None if test_idx is None else _mnist_examples(images, labels, test_idx),
    )


def load_test_data(data_dir: Path | None = None) -> ExampleDataset:
    """The bundled digits' test split (20%), or MNIST's 10,000 test images in `data_dir`."""
    if data_dir is None:
        return _digit_images(digits.load_test_data())
    images, labels = mnist.load_images(data_dir, train=False)
    return _mnist_examples(images, labels, np.arange(len(labels)))


train = train_classifier
evaluate = evaluate_classifier


def _digit_images(examples: ExampleDataset) -> TensorExamples:
    """8x8 digits (64 features in 0..1) as normalised 28x28 one-channel images."""
    if not isinstance(examples, TensorExamples):
        raise TaskError("the digits task returned an unexpected data set")
    pixels = examples.features.reshape(-1, 1, 8, 8)
    scaled = F.interpolate(pixels, size=_DIGIT_PIXELS, mode="bilinear", align_corners=False)
    margin = (_IMAGE_PIXELS - _DIGIT_PIXELS) // 2
    images = F.pad(scaled.clamp(0, 1), (margin, margin, margin, margin))
    return TensorExamples((images - fashion_mnist.MEAN) / fashion_mnist.STD, examples.labels)


def _mnist_examples(
    images: torch.Tensor, labels: torch.Tensor, indices: NDArray[np.int64]
) -> TensorExamples:
    return mnist.image_examples(images, labels, indices, fashion_mnist.MEAN, fashion_mnist.STD)


def pretrain(
    data_dir: Path | None, epochs: int, seed: int, device: torch.device
) -> tuple[TransferCNN, float]:
    """Train the whole CNN centrally on Fashion-MNIST's 60,000 training images; returns it and
    its accuracy on the 10,000 test images."""
    images, labels = fashion_mnist.load_images(data_dir, train=True)
    everything = np.arange(len(labels))
    training = mnist.image_examples(
        images, labels, everything, fashion_mnist.MEAN, fashion_mnist.STD
    )
    torch.manual_seed(seed)
    model = TransferCNN()
    config = TrainConfig(local_epochs=epochs, batch_size=64, learning_rate=0.02, seed=seed)
    train_classifier(model, ClientData(train=training), config, device)
    result = evaluate_classifier(model, fashion_mnist.load_test_data(data_dir), device)
    return model, float(result.accuracy or 0.0)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fedlink.common.tasks.digits_transfer --out FILE`: pretrain the backbone."""
    parser = argparse.ArgumentParser(
        prog="python -m fedlink.common.tasks.digits_transfer",
        description="Pretrain the digits-transfer backbone on Fashion-MNIST and write it as "
        "safetensors.",
    )
    parser.add_argument("--out", type=Path, required=True, help="the backbone file to write")
    parser.add_argument(
        "--data-dir", type=Path, help="Fashion-MNIST's IDX files (default: Debian's package)"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    try:
        model, accuracy = pretrain(args.data_dir, args.epochs, args.seed, torch.device(args.device))
        model.to("cpu")
        save_state_file(model.backbone.state_dict(), args.out)
    except (FedlinkError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    pinned = partial.frozen_digest(HEAD_ONLY.frozen(model.state_dict())).hex()
    print(
        f"wrote {args.out}: the backbone after {args.epochs} epochs on Fashion-MNIST "
        f"(test accuracy {accuracy:.4f})"
    )
    print(f"file SHA-256: {hashlib.sha256(args.out.read_bytes()).hexdigest()}")
    print(f'for the coordinator (with exchanged_tensors = ["head.*"]): frozen_sha256 = "{pinned}"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
