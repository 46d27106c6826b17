"""Calling a task's functions the way the task wrote them, and checking what they return.

The contract grew (`load_test_data(data_dir)`, `evaluate(..., task_config)`, named metrics);
tasks written for the first one keep working because each optional parameter is passed only to
a function whose signature accepts it. What a task returns is checked here, on both sides,
before it is sent or aggregated: a task's bug is a TaskError naming the task, not a rejected
result or a corrupt metrics.jsonl.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlink.common.errors import TaskError
from fedlink.common.task_settings import TaskSettings
from fedlink.common.tasks.base import EvalResult, ExampleDataset, TaskModule

# A result header carries at most this many metrics (server/validation.py MAX_METRICS).
MAX_METRICS = 64
MAX_METRIC_NAME_CHARS = 64
_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


@dataclass(frozen=True)
class Evaluation:
    """One evaluation as it travels: the examples it covered and every named metric."""

    num_examples: int
    metrics: dict[str, float]


def takes(function: Callable[..., Any], parameter: str) -> bool:
    """Whether `function` has a parameter called `parameter` (or takes **kwargs). By name, not
    position: `evaluate = evaluate_classifier` has a fourth parameter, batch_size, that must
    never receive the task's settings."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: the original contract
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == parameter and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in parameters
    )


def load_test_set(task: TaskModule, data_dir: Path | None) -> ExampleDataset | None:
    """The coordinator's test set: `load_test_data(data_dir=...)`, or `load_test_data()` for a
    task written before it took a directory (then `data_dir` must be unset)."""
    if takes(task.load_test_data, "data_dir"):
        return task.load_test_data(data_dir=data_dir)
    if data_dir is not None:
        raise TaskError(
            f"test_data_dir is set to {data_dir}, but this task's load_test_data() takes no "
            "data_dir parameter; add one or unset test_data_dir"
        )
    return task.load_test_data()


def evaluate(
    task: TaskModule,
    model: torch.nn.Module,
    dataset: ExampleDataset,
    device: torch.device,
    task_config: TaskSettings,
) -> Evaluation:
    """Run the task's `evaluate` (with `task_config` when it takes it) and check its metrics."""
    if takes(task.evaluate, "task_config"):
        result = task.evaluate(model, dataset, device, task_config=task_config)
    else:
        result = task.evaluate(model, dataset, device)
    if not isinstance(result, EvalResult):
        raise TaskError(f"evaluate() returned {type(result).__name__}; it must return EvalResult")
    return Evaluation(result.num_examples, named_metrics(result))


def named_metrics(result: EvalResult) -> dict[str, float]:
    """Every metric of `result` by name (loss, accuracy when there is one, the rest), checked:
    names short and plain, values finite, at most MAX_METRICS."""
    metrics: dict[str, Any] = {"loss": result.loss}
    if result.accuracy is not None:
        metrics["accuracy"] = result.accuracy
    for name, value in result.metrics.items():
        if name in metrics:
            raise TaskError(f"evaluate() reports {name!r} twice (as a field and in metrics)")
        metrics[name] = value
    return check_metric_values(metrics, "evaluate()")


def is_metric_name(name: object) -> bool:
    """A short plain name: it becomes a metrics.jsonl key, a table cell and a tracker tag."""
    return (
        isinstance(name, str)
        and len(name) <= MAX_METRIC_NAME_CHARS
        and _METRIC_NAME.fullmatch(name) is not None
    )


def check_metric_values(metrics: Mapping[str, Any], source: str) -> dict[str, float]:
    """`metrics` as finite floats, or a TaskError saying which of `source`'s metrics is wrong."""
    if len(metrics) > MAX_METRICS:
        raise TaskError(f"{source} reports {len(metrics)} metrics; at most {MAX_METRICS}")
    checked: dict[str, float] = {}
    for name, value in metrics.items():
        if not is_metric_name(name):
            raise TaskError(
                f"{source}: metric name {name!r} must be a letter or _ followed by letters, "
                f"digits, _ . or -, at most {MAX_METRIC_NAME_CHARS} characters"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TaskError(f"{source}: metric {name!r} is {value!r}, not a number")
        if not math.isfinite(value):
            raise TaskError(f"{source}: metric {name!r} is {value}, not a finite number")
        checked[name] = float(value)
    return checked


def exchanged_tensors(task: TaskModule) -> tuple[str, ...]:
    """The tensor-name patterns a task says are the only ones to exchange (its module-level
    `EXCHANGED_TENSORS`, e.g. LoRA adapters); () when it says nothing (every tensor)."""
    declared = getattr(task, "EXCHANGED_TENSORS", ())
    if not isinstance(declared, (tuple, list)) or not all(isinstance(p, str) for p in declared):
        raise TaskError("EXCHANGED_TENSORS must be a tuple of tensor-name patterns (strings)")
    return tuple(declared)
