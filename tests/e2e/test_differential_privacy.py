"""Client-level DP-FedAvg in a real federation: coordinator and client processes over mTLS."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import fedlink_process, wait_for_file

from fedlink.server.privacy import MechanismStep, PrivacyAccountant


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
