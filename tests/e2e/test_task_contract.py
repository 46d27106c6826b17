"""Tasks beyond classification, end to end: a coordinator and client processes over mTLS whose
task reports metrics other than accuracy, and receives settings from the coordinator."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from conftest import wait_for_file
from test_federation_run import TASKS_DIR, _client, _kill_all, _log, _server


def _federation(
    pki: Any,
    tmp_path: Path,
    task: str,
    clients: int,
    env: dict[str, str] | None = None,
    **server_settings: object,
) -> list[dict[str, Any]]:
    """Run `task` with `clients` client processes to the end; metrics.jsonl's rows."""
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        env,
        listen="127.0.0.1:0",
        address_file=address_file,
        task=task,
        min_clients=clients,
        min_fit_clients=clients,
        **server_settings,
    )
    processes = []
    try:
        address = wait_for_file(address_file, server)
        processes = [
            _client(
                pki,
                tmp_path,
                f"site-{i}",
                address,
                env,
                task=task,
                partition="iid",
                partition_index=i,
                num_partitions=clients,
            )
            for i in range(clients)
        ]
        assert server.wait(timeout=300) == 0, _log(tmp_path, "run")
        for i, process in enumerate(processes):
            assert process.wait(timeout=60) == 0, _log(tmp_path, f"site-{i}")
    finally:
        _kill_all([server, *processes])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_a_regression_federation_reports_mse_mae_and_r2(pki: Any, tmp_path: Path) -> None:
    records = _federation(
        pki,
        tmp_path,
        "diabetes",
        clients=2,
        num_rounds=4,
        local_epochs=2,
        optimizer="adam",
        learning_rate=0.002,
        weight_decay=0.0001,
    )
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    for record in records:
        assert record["test_accuracy"] is None and record["federated_accuracy"] is None
        assert set(record["test_metrics"]) == {"mse", "mae", "r2"}
        assert set(record["federated_metrics"]) == {"mse", "mae", "r2"}
        assert record["test_metrics"]["mse"] == record["test_loss"]
    first, last = records[0]["test_metrics"], records[-1]["test_metrics"]
    assert last["mse"] < first["mse"] and last["r2"] > max(first["r2"], 0.25)
    assert 0.25 < records[-1]["federated_metrics"]["r2"] < 1
    table = _log(tmp_path, "run")
    assert "metrics" in table and f"r2={last['r2']:.4g}" in table
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_task_settings_reach_train_and_evaluate_and_auroc_lands_in_metrics_jsonl(
    pki: Any, tmp_path: Path
) -> None:
    config = tmp_path / "server.toml"
    config.write_text("[task_config]\npositive_digit = 3\n")
    env = {"PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")])}
    records = _federation(
        pki,
        tmp_path,
        "auroc_digits_task",
        clients=2,
        env=env,
        config=config,
        num_rounds=3,
        local_epochs=3,
        learning_rate=0.05,
    )
    assert [r["round"] for r in records] == [1, 2, 3]
    for record in records:
        # AUROC combined from the clients' summed statistics; the statistics themselves are not
        # results and never reach metrics.jsonl.
        assert set(record["test_metrics"]) == {"auroc"}
        assert set(record["federated_metrics"]) == {"auroc"}
    # "Is it a 3?" is learnable: the digit came from [task_config] (the task refuses to train or
    # evaluate without it), and one in ten examples is positive.
    assert records[-1]["test_metrics"]["auroc"] > 0.95
    assert records[-1]["federated_metrics"]["auroc"] > 0.95
    assert records[-1]["test_accuracy"] > 0.9
