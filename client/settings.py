"""What a coordinator tells a client about local training (hyper-parameters, the task's and the
strategy's settings, SCAFFOLD's control variate), checked: a hostile coordinator gets a clear
error and never more than plain, bounded values."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedlink.common.errors import FedlinkError
from fedlink.common.scaffold import SCAFFOLD
from fedlink.common.task_settings import (
    MAX_PROXIMAL_MU,
    NO_SETTINGS,
    PROXIMAL_MU,
    TaskSettings,
    TaskSettingsError,
    settings_from_proto,
    split_settings,
)
from fedlink.common.tasks.base import OPTIMIZERS, DPSGDConfig, TrainConfig
from fedlink.common.tensors import StateDict
from fedlink.v1 import federation_pb2 as pb


class FatalClientError(FedlinkError):
    """The federation refuses this client, or the client cannot take part: do not retry."""


def train_config_from(
    task_config: Mapping[str, str], seed: int, settings: TaskSettings = NO_SETTINGS
) -> TrainConfig:
    """The coordinator's hyper-parameters (and the task's and strategy's `settings`, already
    checked), checked: a hostile coordinator gets a clear error."""
    task_settings, own = split_settings(settings)
    if unknown := sorted(set(own) - {PROXIMAL_MU, SCAFFOLD}):
        raise FatalClientError(
            f"the coordinator sends settings this client does not know ({', '.join(unknown)}); "
            "its strategy needs a newer fedlink on this client"
        )
    proximal_mu = own.get(PROXIMAL_MU, 0.0)
    if (
        isinstance(proximal_mu, bool)
        or not isinstance(proximal_mu, int | float)
        or not 0 <= proximal_mu <= MAX_PROXIMAL_MU
    ):
        raise FatalClientError(
            f"coordinator sent an out-of-range FedProx mu {proximal_mu!r} (0 to {MAX_PROXIMAL_MU:g})"
        )
    try:
        dpsgd = None
        if "dpsgd_noise_multiplier" in task_config:  # record-level DP-SGD; DPSGDConfig checks
            dpsgd = DPSGDConfig(
                noise_multiplier=float(task_config["dpsgd_noise_multiplier"]),
                max_grad_norm=float(task_config.get("dpsgd_max_grad_norm", "1.0")),
                delta=float(task_config.get("dpsgd_delta", "1e-5")),
            )
        config = TrainConfig(
            local_epochs=int(task_config.get("local_epochs", "1")),
            batch_size=int(task_config.get("batch_size", "32")),
            learning_rate=float(task_config.get("learning_rate", "0.01")),
            momentum=float(task_config.get("momentum", "0.9")),
            weight_decay=float(task_config.get("weight_decay", "0.0")),
            optimizer=task_config.get("optimizer", "sgd"),
            seed=seed,
            dpsgd=dpsgd,
            task_config=task_settings,
            proximal_mu=float(proximal_mu),
        )
    except ValueError as exc:
        raise FatalClientError(f"coordinator sent malformed training settings: {exc}") from None
    if not (1 <= config.local_epochs <= 10_000 and 1 <= config.batch_size <= 1 << 20):
        raise FatalClientError(f"coordinator sent out-of-range training settings: {config}")
    if not (0 < config.learning_rate <= 100 and 0 <= config.momentum < 1):
        raise FatalClientError(f"coordinator sent out-of-range training settings: {config}")
    if not all(math.isfinite(v) for v in (config.learning_rate, config.momentum)):
        raise FatalClientError("coordinator sent non-finite training settings")
    if not 0 <= config.weight_decay <= 1 or config.optimizer not in OPTIMIZERS:
        raise FatalClientError(
            f"coordinator sent out-of-range training settings: weight_decay "
            f"{config.weight_decay} (0 to 1), optimizer {config.optimizer!r} "
            f"({', '.join(OPTIMIZERS)})"
        )
    if runs_scaffold(settings) and (
        config.optimizer != "sgd" or config.momentum != 0 or config.dpsgd is not None
    ):
        raise FatalClientError(
            "the coordinator runs SCAFFOLD with optimizer "
            f"{config.optimizer!r}, momentum {config.momentum:g}"
            f"{' and DP-SGD' if config.dpsgd else ''}; SCAFFOLD needs plain SGD steps"
        )
    return config


def runs_scaffold(settings: TaskSettings) -> bool:
    """Whether the coordinator's settings say the federation runs SCAFFOLD (checked)."""
    value = settings.get(SCAFFOLD, False)
    if not isinstance(value, bool):
        raise FatalClientError(f"coordinator sent {SCAFFOLD} = {value!r}; it must be a boolean")
    return value


def task_settings_from(header: pb.TaskHeader) -> TaskSettings:
    """The task's settings a header carries, checked (plain bounded values, never code)."""
    try:
        return settings_from_proto(header.task_config)
    except TaskSettingsError as exc:
        raise FatalClientError(f"coordinator sent invalid task settings: {exc}") from None


def checked_control(control: Mapping[str, torch.Tensor], travelling: StateDict) -> StateDict:
    """The server's control variate c from a download, checked against the model (one finite
    floating tensor of the same shape per floating travelling tensor) and copied out of it."""
    expected = {name for name, t in travelling.items() if t.dtype.is_floating_point}
    if control.keys() != expected:
        raise FatalClientError(
            "the coordinator sent SCAFFOLD control variates for other tensors than the "
            "model's floating ones"
        )
    for name, c in control.items():
        if (
            not c.dtype.is_floating_point
            or c.shape != travelling[name].shape
            or not bool(torch.isfinite(c).all())
        ):
            raise FatalClientError(
                f"the coordinator sent a SCAFFOLD control variate for {name!r} that does not fit "
                f"the model (dtype {c.dtype}, shape {tuple(c.shape)}) or is not finite"
            )
    return {name: c.clone() for name, c in control.items()}
