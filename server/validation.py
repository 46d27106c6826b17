"""Checks every update must pass before a byte of it is aggregated."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedlink.common.errors import UpdateRejected
from fedlink.common.tensors import Manifest

MAX_METRICS = 64


def check_num_examples(num_examples: int, cap: int) -> None:
    if num_examples <= 0:
        raise UpdateRejected(
            "INVALID_ARGUMENT", f"num_examples must be positive, got {num_examples}"
        )
    if num_examples > cap:
        raise UpdateRejected(
            "INVALID_ARGUMENT",
            f"num_examples {num_examples} exceeds this federation's cap of {cap}",
        )


def check_metrics(metrics: Mapping[str, float]) -> None:
    if len(metrics) > MAX_METRICS:
        raise UpdateRejected("INVALID_ARGUMENT", f"at most {MAX_METRICS} metrics per result")
    for name, value in metrics.items():
        if not math.isfinite(value):
            raise UpdateRejected("INVALID_ARGUMENT", f"metric {name!r} is not finite")


def check_update(state: Mapping[str, torch.Tensor], manifest: Manifest) -> None:
    """Same tensor names, dtypes and shapes as the global model, and only finite values."""
    missing = sorted(set(manifest) - set(state))
    if missing:
        raise UpdateRejected("INVALID_ARGUMENT", f"update is missing tensor(s): {_names(missing)}")
    unknown = sorted(set(state) - set(manifest))
    if unknown:
        raise UpdateRejected("INVALID_ARGUMENT", f"update has unknown tensor(s): {_names(unknown)}")
    for name, spec in manifest.items():
        tensor = state[name]
        if tensor.dtype != spec.dtype:
            raise UpdateRejected(
                "INVALID_ARGUMENT",
                f"tensor {name!r} has dtype {tensor.dtype}; the global model has {spec.dtype}",
            )
        if tuple(tensor.shape) != spec.shape:
            raise UpdateRejected(
                "INVALID_ARGUMENT",
                f"tensor {name!r} has shape {tuple(tensor.shape)}; the global model has {spec.shape}",
            )
    for name, tensor in state.items():
        if tensor.dtype.is_floating_point and not _all_finite(tensor):
            raise UpdateRejected("INVALID_ARGUMENT", f"tensor {name!r} contains NaN or Inf")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Exact, and fast for the common case: one reduction without a temporary. NaN and Inf
    propagate into the sum, so a finite sum proves every element finite; a non-finite sum may
    also be an overflow of large finite values, so only then is the elementwise check run."""
    if math.isfinite(tensor.sum().item()):
        return True
    return bool(torch.isfinite(tensor).all())


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
