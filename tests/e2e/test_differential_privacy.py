"""Differential privacy in real federations (coordinator and client processes over mTLS):
client-level DP-FedAvg on the coordinator, record-level DP-SGD on the clients."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import fedlink_process, wait_for_file
from test_federation_run import TASKS_DIR, _kill_all, _log, _start_federation

from fedlink.common.accounting import MechanismStep, PrivacyAccountant
from fedlink.common.tasks import digits
from fedlink.common.tasks.base import DataRequest


def _flags(**values: object) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]


def test_a_dp_federation_reports_epsilon_and_stops_when_the_budget_is_spent(
    pki: Any, tmp_path: Path
) -> None:
    z, delta, clients = 1.0, 1e-5, 3

    def epsilon(rounds: int) -> float:
        return PrivacyAccountant((MechanismStep(z, 1.0, rounds),)).epsilon(delta)

    budget = (epsilon(2) + epsilon(3)) / 2  # room for two rounds, not three
    bundle = pki.server_dir
    run_dir, address_file = tmp_path / "run", tmp_path / "address"
    server = fedlink_process(
        [
            "server",
            *_flags(
                cert=bundle / "server.pem",
                key=bundle / "server.key",
                ca=bundle / "ca.pem",
                listen="127.0.0.1:0",
                address_file=address_file,
                num_rounds=5,
                min_clients=clients,
                min_fit_clients=clients,
                heartbeat_interval_seconds=1,
                run_dir=run_dir,
                state_dir=tmp_path / "state",
                dp_clip_norm=1.0,
                dp_noise_multiplier=z,
                dp_delta=delta,
                dp_max_epsilon=budget,
            ),
        ],
        tmp_path / "server.log",
    )
    processes = [server]
    try:
        address = wait_for_file(address_file, server)
        for i in range(clients):
            cert, key, ca = pki.client(f"site-{i}")
            processes.append(
                fedlink_process(
                    [
                        "client",
                        *_flags(
                            cert=cert,
                            key=key,
                            ca=ca,
                            server=address,
                            partition="iid",
                            partition_index=i,
                            num_partitions=clients,
                        ),
                    ],
                    tmp_path / f"site-{i}.log",
                )
            )
        server_log = tmp_path / "server.log"
        assert server.wait(timeout=300) == 0, server_log.read_text()
        for i, client in enumerate(processes[1:]):
            assert client.wait(timeout=60) == 0, (tmp_path / f"site-{i}.log").read_text()
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = server_log.read_text()
    assert "privacy budget spent: round 3 would take epsilon" in log
    assert "federation finished early: privacy budget" in log
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    for rounds, record in enumerate(records, start=1):
        assert abs(record["epsilon"] - epsilon(rounds)) < 1e-9
        assert f"{record['epsilon']:.3f}" in log  # the round table's epsilon column
    assert (run_dir / "final_model.safetensors").exists()


def test_dpsgd_clients_report_a_growing_epsilon_and_the_run_completes(
    pki: Any, tmp_path: Path
) -> None:
    z, batch, epochs, delta, clients, rounds = 1.0, 16, 2, 1e-5, 3, 3
    server, processes, run_dir = _start_federation(
        pki,
        tmp_path,
        rounds=rounds,
        clients=clients,
        local_epochs=epochs,
        batch_size=batch,
        dpsgd_noise_multiplier=z,
        dpsgd_max_grad_norm=1.0,
        dpsgd_delta=delta,
    )
    try:
        assert server.wait(timeout=300) == 0, _log(tmp_path, "run")
        for i, client in enumerate(processes):
            assert client.wait(timeout=60) == 0, _log(tmp_path, f"site-{i}")
    finally:
        _kill_all([server, *processes])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert all(r["clients_accepted"] == clients for r in records)  # updates with plain names
    # metrics.jsonl carries the largest epsilon the round's clients reported.
    largest = [r["dpsgd_epsilon"] for r in records]
    assert 0 < largest[0] < largest[1] < largest[2]
    for i in range(clients):
        log = _log(tmp_path, f"site-{i}")
        reported = [
            (int(number), float(epsilon))
            for number, epsilon in re.findall(r"round (\d+): DP-SGD epsilon ([0-9.]+)", log)
        ]
        assert [number for number, _ in reported] == [1, 2, 3], log
        epsilons = [epsilon for _, epsilon in reported]
        assert (
            all(math.isfinite(e) for e in epsilons) and 0 < epsilons[0] < epsilons[1] < epsilons[2]
        )
        # Each round: epochs x ceil(N / batch) Poisson-sampled steps at q = 1 / ceil(N / batch).
        request = DataRequest(partition="iid", partition_index=i, num_partitions=clients)
        steps = math.ceil(len(digits.load_data(request).train) / batch)  # type: ignore[arg-type]
        for rounds_done, epsilon in enumerate(epsilons, start=1):
            mechanism = MechanismStep(z, 1 / steps, rounds_done * epochs * steps)
            expected = PrivacyAccountant((mechanism,)).epsilon(delta)
            assert epsilon == pytest.approx(expected, abs=1e-4)
            assert epsilon <= largest[rounds_done - 1] + 1e-4


@pytest.mark.parametrize(
    ("task", "refusal"),
    [
        # BatchNorm: refused when the client joins, before it pulls a task.
        ("batchnorm_digits_task", "record-level DP-SGD cannot train this model"),
        # A task whose train() ignores config.dpsgd: refused after training, before uploading.
        (
            "big_model_task",
            "asks for record-level DP-SGD but task 'big_model_task' trained without",
        ),
    ],
)
def test_a_client_that_cannot_train_with_dpsgd_stops_without_sending_an_update(
    pki: Any, tmp_path: Path, task: str, refusal: str
) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")]),
        "BIG_MODEL_WIDTH": "8",
    }
    server, processes, run_dir = _start_federation(
        pki, tmp_path, rounds=1, clients=1, task=task, env=env, dpsgd_noise_multiplier=1.0
    )
    try:
        assert processes[0].wait(timeout=120) == 2, _log(tmp_path, "site-0")
    finally:
        _kill_all([server, *processes])
    log = _log(tmp_path, "site-0")
    assert refusal in log and "Traceback" not in log
    assert "uploading update" not in log
    metrics = run_dir / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no round completed
