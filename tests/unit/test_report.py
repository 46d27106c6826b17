"""What a run shows people: the round table, the plot's panels, the trackers' scalars."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fedlink.server.config import ServerConfig
from fedlink.server.phases import RoundRecord
from fedlink.server.report import metric_panels, plot_metrics, table_header, table_row
from fedlink.server.tracking import round_metrics, run_settings


def _record(round_number: int, **fields: Any) -> RoundRecord:
    values: dict[str, Any] = {
        "round": round_number,
        "clients_sampled": 2,
        "clients_accepted": 2,
        "rejected": {},
        "train_loss": 1.0,
        "test_loss": 0.5,
        "test_accuracy": None,
        "federated_loss": 0.6,
        "federated_accuracy": None,
        "seconds": 1.0,
        "bytes_down": 1_000_000,
        "bytes_up": 1_000_000,
    }
    return RoundRecord(**{**values, **fields})


def test_the_table_shows_the_tasks_own_metrics_after_the_fixed_columns() -> None:
    row = table_row(dataclasses.asdict(_record(1, test_metrics={"mae": 0.61234, "r2": 0.3})))
    assert row.endswith("mae=0.6123 r2=0.3")
    assert table_header().split()[-1] == "metrics"
    federated_only = table_row(dataclasses.asdict(_record(1, federated_metrics={"auroc": 0.9})))
    assert federated_only.endswith("auroc=0.9")
    old_row = dataclasses.asdict(_record(1))
    del old_row["test_metrics"], old_row["federated_metrics"]  # a row from before they existed
    assert table_row(old_row).split()[-1] == "-"  # the epsilon column ends it


def test_the_plot_has_a_panel_per_task_metric_and_none_for_absent_ones(tmp_path: Path) -> None:
    records = [
        dataclasses.asdict(
            _record(r, test_metrics={"r2": 0.1 * r}, federated_metrics={"r2": 0.2, "mae": 0.5})
        )
        for r in (1, 2)
    ]
    panels = dict(metric_panels(records))
    assert list(panels) == ["loss", "r2", "mae"]  # no accuracy and no privacy: never reported
    assert dict(panels["r2"]) == {
        "centralized test": [(1, 0.1), (2, 0.2)],
        "federated eval": [(1, 0.2), (2, 0.2)],
    }
    assert dict(panels["mae"]) == {"federated eval": [(1, 0.5), (2, 0.5)]}
    plot_metrics(records, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trackers_get_the_tasks_metrics_as_test_and_federated_scalars() -> None:
    scalars = round_metrics(_record(3, test_metrics={"r2": 0.4}, federated_metrics={"r2": 0.5}))
    assert scalars["test_r2"] == 0.4 and scalars["federated_r2"] == 0.5
    assert scalars["test_loss"] == 0.5 and "test_accuracy" not in scalars
    assert "test_metrics" not in scalars


def test_trackers_get_each_task_setting_as_a_parameter() -> None:
    config = ServerConfig(insecure=True, task_config={"mu": 0.01, "mode": "fast"})
    settings = run_settings(config)
    assert settings["task_config.mu"] == "0.01" and settings["task_config.mode"] == "fast"
    assert "task_config" not in settings
