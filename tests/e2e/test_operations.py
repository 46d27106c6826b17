"""What an operator sees while a federation starts: real processes over mTLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for_file
from test_fault_tolerance import _records, _wait_until
from test_federation_run import _client, _kill_all, _log, _server
from test_simulated_attack import _federation


def test_the_coordinator_says_how_many_clients_round_one_still_waits_for(
    pki: Any, tmp_path: Path
) -> None:
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        listen="127.0.0.1:0",
        address_file=address_file,
        num_rounds=1,
        min_clients=2,
        min_fit_clients=2,
        evaluate_every=0,
    )
    clients = []
    try:
        address = wait_for_file(address_file, server)
        _wait_until(
            lambda: (
                "round 1: waiting for 2 more client(s) (0 of 2 connected)" in _log(tmp_path, "run")
            ),
            "the first waiting line",
            timeout=60,
        )
        clients.append(_client(pki, tmp_path, "site-0", address, threads=1))
        _wait_until(
            lambda: (
                "round 1: waiting for 1 more client(s) (1 of 2 connected)" in _log(tmp_path, "run")
            ),
            "the line after one client joined",
            timeout=120,
        )
        clients.append(_client(pki, tmp_path, "site-1", address))
        assert server.wait(timeout=120) == 0, _log(tmp_path, "run")
        assert all(client.wait(timeout=60) == 0 for client in clients)
    finally:
        _kill_all([server, *clients])
    # --threads 1 is what torch computes with (the other client: OMP_NUM_THREADS=1 from the env).
    assert "client running task digits on cpu (1 CPU threads)" in _log(tmp_path, "site-0")


def test_every_round_reaches_tensorboard_and_mlflow_as_in_metrics_jsonl(
    pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mlruns = f"file://{tmp_path / 'mlruns'}"
    # MLflow 3 keeps its file store only on request; a real deployment points at a server.
    env = {"MLFLOW_ALLOW_FILE_STORE": "true"}
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the reader below
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        env,
        listen="127.0.0.1:0",
        address_file=address_file,
        num_rounds=3,
        mlflow_tracking_uri=mlruns,
        mlflow_experiment="hospitals",
    )
    client = None
    try:
        client = _client(pki, tmp_path, "site-0", wait_for_file(address_file, server))
        assert server.wait(timeout=120) == 0, _log(tmp_path, "run")
        assert client.wait(timeout=60) == 0
    finally:
        _kill_all([server, client])
    records = _records(tmp_path / "run")
    expected = [(r["round"], r["test_accuracy"]) for r in records]
    assert [e[0] for e in expected] == [1, 2, 3]

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("test_accuracy")]
    assert [s[0] for s in scalars] == [1, 2, 3]
    assert all(abs(s[1] - e[1]) < 1e-6 for s, e in zip(scalars, expected, strict=True))
    assert {"train_loss", "seconds", "bytes_up", "clients_accepted"} <= set(
        events.Tags()["scalars"]
    )

    mlflow = MlflowClient(tracking_uri=mlruns)
    experiment = mlflow.get_experiment_by_name("hospitals")
    assert experiment is not None
    (run,) = mlflow.search_runs([experiment.experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["task"] == "digits" and run.data.params["num_rounds"] == "3"
    assert "cert" not in run.data.params and "key" not in run.data.params
    history = mlflow.get_metric_history(run.info.run_id, "test_accuracy")
    assert [(m.step, round(m.value, 6)) for m in history] == [(r, round(a, 6)) for r, a in expected]
    assert (tmp_path / "run" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clients_jsonl_has_a_row_per_client_per_round_with_its_result_and_why(
    pki: Any, tmp_path: Path
) -> None:
    # "attacker" sends Gaussian noise, which max_update_norm_ratio refuses every round; both
    # clients evaluate the new model.
    records = _federation(
        pki, tmp_path, ["site-0", "attacker"], "--num-rounds=2", "--evaluate-every=1"
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "clients.jsonl").open()]
    assert [(r["round"], r["client"]) for r in rows] == [
        (1, "attacker"),
        (1, "site-0"),
        (2, "attacker"),
        (2, "site-0"),
    ]
    for row, record in zip(rows[1::2], records, strict=True):  # the honest client's rows
        assert row["sampled"] and row["round_completed"] and row["attempt"] == 0
        train, evaluate = row["train"], row["evaluate"]
        assert train["result"] == "accepted" and evaluate["result"] == "accepted"
        assert train["num_examples"] > 0 and evaluate["num_examples"] > 0
        # The only accepted update: its loss is the round's training loss.
        assert train["metrics"]["loss"] == pytest.approx(record["train_loss"])
        assert 0 <= evaluate["metrics"]["accuracy"] <= 1
        assert 0 <= train["upload_seconds"] < 60
        # It downloaded the model twice (train, evaluate) and uploaded one update.
        assert row["bytes_down"] > row["bytes_up"] > 0
    for row in rows[0::2]:
        assert row["train"]["result"] == "rejected"
        assert "max_update_norm_ratio" in row["train"]["reason"]
        assert row["evaluate"]["result"] == "accepted"
    assert sum(r["bytes_up"] for r in rows if r["round"] == 1) == records[0]["bytes_up"]
