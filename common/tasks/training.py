"""The standard supervised classification loop that built-in tasks (and most user tasks) use.

Written like pytorch/examples' mnist/main.py: SGD, cross-entropy, a DataLoader, explicit device
handling. Shuffling is seeded from the round's TrainConfig, so a client's round is reproducible.
"""

from __future__ import annotations

from collections.abc import Sized

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedlink.common.errors import TaskError
from fedlink.common.tasks.base import (
    ClientData,
    EvalResult,
    ExampleDataset,
    TrainConfig,
    TrainResult,
)


def train_classifier(
    model: torch.nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    """Train `model` on `data.train` for `config.local_epochs` epochs; it stays on `device`."""
    if config.local_epochs < 1 or config.batch_size < 1:
        raise TaskError(
            f"local_epochs and batch_size must be at least 1, got {config.local_epochs} "
            f"and {config.batch_size}"
        )
    num_examples = _size(data.train, "training")
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator)
    model.to(device)
    model.train()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.learning_rate,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    total_loss, seen = 0.0, 0
    for _ in range(config.local_epochs):
        for features, labels in loader:
            features, labels = features.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(features), labels)
            torch.autograd.backward(loss)  # loss.backward(), which torch leaves untyped
            optimizer.step()
            total_loss += loss.item() * len(labels)
            seen += len(labels)
    return TrainResult(num_examples=num_examples, loss=total_loss / seen)


def evaluate_classifier(
    model: torch.nn.Module, dataset: ExampleDataset, device: torch.device, batch_size: int = 256
) -> EvalResult:
    """Mean cross-entropy loss and accuracy of `model` on `dataset`."""
    num_examples = _size(dataset, "evaluation")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.to(device)
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for features, labels in loader:
            features, labels = features.to(device), labels.to(device)
            logits = model(features)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(dim=1) == labels).sum().item())
    return EvalResult(
        num_examples=num_examples, loss=total_loss / num_examples, accuracy=correct / num_examples
    )


def _size(dataset: ExampleDataset, role: str) -> int:
    if not isinstance(dataset, Sized):
        raise TaskError(f"the {role} data set must define __len__")
    if len(dataset) == 0:
        raise TaskError(f"the {role} data set is empty")
    return len(dataset)
