"""A real client started with --simulate-attack poisons its updates, and says so in its log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import fedlink_process, wait_for_file


def _tls(pki: Any, name: str) -> list[str]:
    if name == "server":
        bundle = pki.server_dir
        cert, key, ca = bundle / "server.pem", bundle / "server.key", bundle / "ca.pem"
    else:
        cert, key, ca = pki.client(name)
    return [f"--cert={cert}", f"--key={key}", f"--ca={ca}"]


def _federation(
    pki: Any, tmp_path: Path, clients: list[str], *server_flags: str
) -> list[dict[str, Any]]:
    """Run a digits federation whose client named "attacker" sends Gaussian noise (sigma 200);
    the coordinator's metrics.jsonl rows."""
    address_file = tmp_path / "address"
    server = fedlink_process(
        [
            "server",
            *_tls(pki, "server"),
            "--listen=127.0.0.1:0",
            f"--address-file={address_file}",
            "--task=digits",
            f"--min-clients={len(clients)}",
            f"--min-fit-clients={len(clients)}",
            "--evaluate-every=0",
            "--heartbeat-interval-seconds=1",
            f"--run-dir={tmp_path / 'run'}",
            f"--state-dir={tmp_path / 'state'}",
            *server_flags,
        ],
        tmp_path / "server.log",
    )
    processes = [server]
    try:
        address = wait_for_file(address_file, server)
        for index, name in enumerate(clients):
            attack = ["--simulate-attack=gaussian,sigma=200"] if name == "attacker" else []
            arguments = [
                "client",
                *_tls(pki, name),
                f"--server={address}",
                "--task=digits",
                f"--partition-index={index}",
                f"--num-partitions={len(clients)}",
                *attack,
            ]
            processes.append(fedlink_process(arguments, tmp_path / f"{name}.log"))
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()
        for process in processes[1:]:
            assert process.wait(timeout=60) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]


def test_a_gaussian_attacker_wrecks_plain_fedavg_and_warns_every_round(
    pki: Any, tmp_path: Path
) -> None:
    # With the distance bound off: plain FedAvg itself has no defence.
    records = _federation(
        pki, tmp_path, ["honest", "attacker"], "--num-rounds=2", "--max-update-norm-ratio=0"
    )
    attacker_log = (tmp_path / "attacker.log").read_text()
    assert "SIMULATED ATTACK 'gaussian,sigma=200'" in attacker_log
    assert attacker_log.count("SIMULATED gaussian ATTACK: poisoning this update") == 2
    assert "SIMULATED" not in (tmp_path / "honest.log").read_text()
    assert [r["clients_accepted"] for r in records] == [2, 2]
    # Half of every average is N(0, 200^2) noise: the model is no better than guessing.
    assert records[-1]["test_accuracy"] < 0.3


def test_the_default_distance_bound_refuses_the_same_attacker_every_round(
    pki: Any, tmp_path: Path
) -> None:
    # N(0, 200^2) on each of ~10k weights is ~20,000 away from a model of norm ~7: far past
    # max_update_norm_ratio's 100x. Only the honest update is averaged.
    records = _federation(pki, tmp_path, ["honest", "attacker"], "--num-rounds=2")
    assert [r["clients_accepted"] for r in records] == [1, 1]
    assert all("max_update_norm_ratio" in r["rejected"]["attacker"] for r in records)
    assert records[-1]["test_accuracy"] > 0.5


def test_a_robust_rule_keeps_the_model_useful_under_the_same_attack(
    pki: Any, tmp_path: Path
) -> None:
    records = _federation(
        pki,
        tmp_path,
        ["honest-1", "honest-2", "honest-3", "attacker"],
        "--num-rounds=5",
        "--min-results=4",
        "--max-update-norm-ratio=0",  # the rule at work, not the bound
        "--aggregation=median",
        "--learning-rate=0.05",
        "--local-epochs=2",
    )
    assert (tmp_path / "attacker.log").read_text().count("poisoning this update") == 5
    assert [r["clients_accepted"] for r in records] == [4] * 5
    # The coordinate-wise median ignores the one noisy update in four.
    assert records[-1]["test_accuracy"] > 0.8
