"""The standard supervised loops that built-in tasks (and most user tasks) use.

Written like pytorch/examples' mnist/main.py: an optimizer (SGD by default, Adam or AdamW when
the coordinator asks), a loss (cross-entropy for classifiers, MSE for regression), a DataLoader,
explicit device handling. Shuffling is seeded from the round's TrainConfig, so a client's round
is reproducible; with record-level DP-SGD (`TrainConfig.dpsgd`) batches and noise are secret, so
it is not.
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Sized

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from fedlink.common.accounting import MechanismStep
from fedlink.common.errors import TaskError
from fedlink.common.tasks.base import (
    OPTIMIZERS,
    ClientData,
    ControlCorrection,
    DPSGDConfig,
    EvalResult,
    ExampleDataset,
    TrainConfig,
    TrainResult,
)

# A batch's mean loss from the model's outputs and the labels.
LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_classifier(
    model: torch.nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    """Train a classifier (logits, int64 class labels) with cross-entropy."""
    return train_supervised(model, data, config, device, F.cross_entropy)


def train_regressor(
    model: torch.nn.Module, data: ClientData, config: TrainConfig, device: torch.device
) -> TrainResult:
    """Train a regressor (one output per target, floating targets) with mean squared error."""
    return train_supervised(model, data, config, device, _mse)


def train_supervised(
    model: torch.nn.Module,
    data: ClientData,
    config: TrainConfig,
    device: torch.device,
    loss_function: LossFunction,
) -> TrainResult:
    """Train `model` on `data.train` for `config.local_epochs` epochs; it stays on `device`.

    With `config.dpsgd` set, trains with record-level DP-SGD (`_train_private`) instead.
    """
    if config.local_epochs < 1 or config.batch_size < 1:
        raise TaskError(
            f"local_epochs and batch_size must be at least 1, got {config.local_epochs} "
            f"and {config.batch_size}"
        )
    num_examples = _size(data.train, "training")
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    if config.proximal_mu > 0:
        add_proximal_term(optimizer, model, config.proximal_mu)
    if config.scaffold is not None:
        add_control_correction(optimizer, model, config.scaffold)
    if config.dpsgd is not None:
        return _train_private(
            model, data.train, num_examples, optimizer, config, config.dpsgd, device, loss_function
        )
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(data.train, batch_size=config.batch_size, shuffle=True, generator=generator)
    total_loss, seen = 0.0, 0
    for _ in range(config.local_epochs):
        for features, labels in loader:
            total_loss += _step(model, optimizer, features, labels, device, loss_function)
            seen += len(labels)
    return TrainResult(num_examples=num_examples, loss=total_loss / seen)


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, with its learning rate and weight decay (and
    momentum, for SGD: Adam's moments are its own)."""
    parameters = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=config.learning_rate,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    if config.optimizer == "adam":
        return torch.optim.Adam(
            parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters, lr=config.learning_rate, weight_decay=config.weight_decay
        )
    raise TaskError(
        f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
    )


def add_proximal_term(optimizer: torch.optim.Optimizer, model: torch.nn.Module, mu: float) -> None:
    """FedProx (Li et al. 2020): make every `optimizer` step minimise the local loss plus
    (mu / 2) ||w - w_global||^2, where w_global is `model` as it is now (the global model, just
    received), by adding that term's gradient mu (w - w_global) to each parameter's gradient
    right before the step.

    Added just before the step, after DP-SGD has clipped and noised the data's gradient: the
    term depends on no example, so it costs no privacy (post-processing) and is never clipped.
    A task with its own training loop calls this on its optimizer before the first step.
    """
    anchors = {p: p.detach().clone() for p in model.parameters() if p.requires_grad}

    def proximal_gradient(*_: object) -> None:
        with torch.no_grad():
            for parameter, anchor in anchors.items():
                if parameter.grad is not None:
                    parameter.grad.add_(parameter - anchor, alpha=mu)

    optimizer.register_step_pre_hook(proximal_gradient)


def add_control_correction(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, control: ControlCorrection
) -> None:
    """SCAFFOLD (Karimireddy et al. 2020): make every `optimizer` step use g - c_i + c instead
    of the gradient g, by adding `control.correction` (c - c_i, by parameter name) to each
    parameter's gradient right before the step, and count the steps in `control.steps` (K,
    which the client's control-variate update divides by).

    The rule assumes plain SGD steps (the coordinator refuses momentum and Adam with SCAFFOLD).
    A task with its own training loop calls this on its optimizer before the first step.
    """
    corrections = [
        (parameter, control.correction[name].to(parameter.device, parameter.dtype))
        for name, parameter in model.named_parameters()
        if name in control.correction
    ]

    def corrected_gradient(*_: object) -> None:
        with torch.no_grad():
            for parameter, correction in corrections:
                if parameter.grad is not None:
                    parameter.grad.add_(correction)
        control.steps += 1

    optimizer.register_step_pre_hook(corrected_gradient)


def check_dpsgd_model(model: torch.nn.Module) -> None:
    """Refuse, with a TaskError a person can act on, a model that DP-SGD cannot train.

    Per-example gradients need every layer to treat examples independently: BatchNorm mixes the
    examples of a batch (each one's output depends on the others), so Opacus rejects it.
    """
    from opacus.validators import ModuleValidator  # slow import; only DP-SGD needs it

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        reasons = sorted({str(error).split(". ")[0] for error in errors})
        raise TaskError(
            f"record-level DP-SGD cannot train this model: {'; '.join(reasons)} "
            f"(layers refused: {len(errors)}). Use a model without BatchNorm (GroupNorm or "
            "LayerNorm work), or run the federation without dpsgd_noise_multiplier"
        )


def _train_private(
    model: torch.nn.Module,
    dataset: ExampleDataset,
    num_examples: int,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    dpsgd: DPSGDConfig,
    device: torch.device,
    loss_function: LossFunction,
) -> TrainResult:
    """DP-SGD (Abadi et al., CCS 2016) through Opacus: per-example gradients clipped to
    `max_grad_norm` C, N(0, (z C)^2) added to each batch's sum, batches Poisson-sampled.

    Each example joins each batch independently with probability q = 1 / ceil(N / batch_size)
    (so the expected batch is about batch_size) for ceil(N / batch_size) steps an epoch, as
    Opacus's `make_private` does; the returned MechanismStep records z, q and the steps taken.
    Sampling and noise come from generators seeded from the OS's randomness, never from the
    round seed: the coordinator knows that seed, and knowing the batches or the noise would
    void the guarantee. The model is wrapped only for this call, so its state_dict keeps the
    plain parameter names and no Opacus hooks stay on it.
    """
    from opacus import GradSampleModule
    from opacus.data_loader import DPDataLoader
    from opacus.optimizers import DPOptimizer

    check_dpsgd_model(model)
    steps_per_epoch = math.ceil(num_examples / config.batch_size)
    sample_rate = 1 / steps_per_epoch
    sampling = torch.Generator().manual_seed(secrets.randbits(63))
    noise = torch.Generator(device=device).manual_seed(secrets.randbits(63))
    loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=sampling)
    private_optimizer = DPOptimizer(
        optimizer,
        noise_multiplier=dpsgd.noise_multiplier,
        max_grad_norm=dpsgd.max_grad_norm,
        expected_batch_size=max(1, round(num_examples * sample_rate)),
        generator=noise,
    )
    wrapped = GradSampleModule(model)
    total_loss, seen, steps = 0.0, 0, 0
    try:
        with warnings.catch_warnings():
            # Opacus's hooks fire on the first layer, whose input needs no gradient: torch warns.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(config.local_epochs):
                for features, labels in loader:
                    # An empty batch (possible under Poisson sampling) still takes a noisy step.
                    total_loss += _step(
                        wrapped, private_optimizer, features, labels, device, loss_function
                    )
                    seen += len(labels)
                    steps += 1
    finally:
        wrapped.to_standard_module()  # removes the hooks and the per-example gradients
    step = MechanismStep(dpsgd.noise_multiplier, sample_rate, steps)
    return TrainResult(num_examples=num_examples, loss=total_loss / max(seen, 1), dpsgd=step)


def _step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    loss_function: LossFunction,
) -> float:
    """One optimizer step on a batch; returns the batch's summed loss."""
    features, labels = features.to(device), labels.to(device)
    optimizer.zero_grad()
    loss = loss_function(model(features), labels)
    torch.autograd.backward(loss)  # loss.backward(), which torch leaves untyped
    optimizer.step()
    return loss.item() * len(labels) if len(labels) else 0.0


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


def evaluate_regressor(
    model: torch.nn.Module, dataset: ExampleDataset, device: torch.device, batch_size: int = 256
) -> EvalResult:
    """Mean squared error (the loss), mean absolute error and R² of `model` on `dataset`.

    R² = 1 - MSE / Var(y) cannot be averaged over clients (each has its own variance), so it is
    reported through the statistics it follows from, as means the coordinator can average:
    `target_mean` and `target_square_mean`; `r2_from_means` completes it (server side, and
    here for this data set alone).
    """
    num_examples = _size(dataset, "evaluation")
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model.to(device)
    model.eval()
    squared, absolute, total, total_squares = 0.0, 0.0, 0.0, 0.0
    with torch.no_grad():
        for features, targets in loader:
            features, targets = features.to(device), targets.to(device).float()
            error = model(features).reshape(targets.shape) - targets
            squared += float((error**2).sum())
            absolute += float(error.abs().sum())
            total += float(targets.sum())
            total_squares += float((targets**2).sum())
    means = {
        "mse": squared / num_examples,
        "target_mean": total / num_examples,
        "target_square_mean": total_squares / num_examples,
    }
    return EvalResult(
        num_examples=num_examples,
        loss=means["mse"],
        metrics={"mae": absolute / num_examples, **means, "r2": r2_from_means(means)},
    )


def r2_from_means(means: dict[str, float]) -> float:
    """R² from the mean squared error and the targets' first two moments (all example means);
    0 when the targets do not vary (nothing to explain)."""
    variance = means["target_square_mean"] - means["target_mean"] ** 2
    return 1.0 - means["mse"] / variance if variance > 0 else 0.0


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.reshape(targets.shape), targets.float())


def _size(dataset: ExampleDataset, role: str) -> int:
    if not isinstance(dataset, Sized):
        raise TaskError(f"the {role} data set must define __len__")
    if len(dataset) == 0:
        raise TaskError(f"the {role} data set is empty")
    return len(dataset)
