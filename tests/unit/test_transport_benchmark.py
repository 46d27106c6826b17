"""The transport benchmark's verdicts: each target is checked on the rows it is about."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "transport.py"


def _benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("transport_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _row(model: str, clients: int, ratio: float) -> dict[str, Any]:
    return {
        "model": model,
        "clients": clients,
        "ratio": ratio,
        "server_peak_rss_bytes": None,
        "memory_limit_bytes": 0,
        "memory_ok": True,
    }


def test_a_large_model_is_held_to_70_percent_of_a_bare_stream() -> None:
    checks = _benchmark().checks([_row("1gib", 1, 1 / 0.75), _row("1gib", 2, 5.0)])
    assert [(c["check"], c["passed"]) for c in checks] == [
        ("one client at >= 70% of a bare stream's rate (1gib)", True)
    ]
    (failed,) = _benchmark().checks([_row("1gib", 1, 2.66)])
    assert not failed["passed"] and round(failed["value"], 3) == 0.376


def test_the_ratio_target_is_checked_with_ten_clients_only() -> None:
    checks = _benchmark().checks([_row("resnet18", 10, 1.2), _row("resnet18", 5, 9.0)])
    assert [(c["check"], c["passed"]) for c in checks] == [
        ("round/wire ratio <= 1.3 (resnet18, 10 clients)", True)
    ]


def test_rounds_with_spread_training_are_held_to_no_target() -> None:
    spread = {**_row("resnet18", 10, 9.0), "train_spread_seconds": 3.0}  # rounds include sleeps
    assert (
        _benchmark().checks([spread, {**_row("1gib", 1, 9.0), "train_spread_seconds": 1.0}]) == []
    )
    assert len(_benchmark().checks([{**spread, "train_spread_seconds": 0.0}])) == 1
