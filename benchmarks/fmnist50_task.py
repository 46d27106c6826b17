"""The simulation benchmark's task: the FedAvg CNN on Fashion-MNIST, 50 training images per
client, however many clients there are.

Client i holds images (50 i ... 50 i + 49) of a seeded permutation of the 60,000, wrapping
around, so 100 clients hold disjoint parts and 10,000 clients each still hold 50 (shared with
others). No centralized test set: the benchmark evaluates the final models itself, outside the
timed rounds. Import it as the task `fmnist50_task` with this directory on PYTHONPATH.
"""

from __future__ import annotations

import numpy as np

from fedlink.common.tasks import fashion_mnist
from fedlink.common.tasks.base import ClientData, DataRequest, ExampleDataset
from fedlink.common.tasks.fashion_mnist import build_model, evaluate, train
from fedlink.common.tasks.mnist import image_examples

__all__ = ["build_model", "evaluate", "load_data", "load_test_data", "train"]

SAMPLES_PER_CLIENT = 50


def load_data(request: DataRequest) -> ClientData:
    images, labels = fashion_mnist.load_images(request.data_dir, train=True)
    order = np.random.default_rng(request.seed).permutation(len(labels))
    start = request.partition_index * SAMPLES_PER_CLIENT
    indices = np.sort(order[np.arange(start, start + SAMPLES_PER_CLIENT) % len(labels)])
    return ClientData(
        train=image_examples(images, labels, indices, fashion_mnist.MEAN, fashion_mnist.STD)
    )


def load_test_data() -> ExampleDataset | None:
    return None


def test_set() -> ExampleDataset:
    """The 10,000 Fashion-MNIST test images, for the benchmark's own accuracy measurement."""
    return fashion_mnist.load_test_data()
