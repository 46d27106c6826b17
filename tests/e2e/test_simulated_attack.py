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


def test_a_gaussian_attacker_wrecks_plain_fedavg_and_warns_every_round(
    pki: Any, tmp_path: Path
) -> None:
    address_file = tmp_path / "address"
    server = fedlink_process(
        [
            "server",
            *_tls(pki, "server"),
            "--listen=127.0.0.1:0",
            f"--address-file={address_file}",
            "--task=digits",
            "--num-rounds=2",
            "--min-clients=2",
            "--min-fit-clients=2",
            "--evaluate-every=0",
            "--heartbeat-interval-seconds=1",
            f"--run-dir={tmp_path / 'run'}",
            f"--state-dir={tmp_path / 'state'}",
        ],
        tmp_path / "server.log",
    )
    processes = [server]
    try:
        address = wait_for_file(address_file, server)
        for index, name in enumerate(("honest", "attacker")):
            attack = ["--simulate-attack=gaussian,sigma=200"] if name == "attacker" else []
            arguments = [
                "client",
                *_tls(pki, name),
                f"--server={address}",
                "--task=digits",
                f"--partition-index={index}",
                "--num-partitions=2",
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
    attacker_log = (tmp_path / "attacker.log").read_text()
    assert "SIMULATED ATTACK 'gaussian,sigma=200'" in attacker_log
    assert attacker_log.count("SIMULATED gaussian ATTACK: poisoning this update") == 2
    assert "SIMULATED" not in (tmp_path / "honest.log").read_text()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["clients_accepted"] for r in records] == [2, 2]
    # Half of every average is N(0, 200^2) noise: the model is no better than guessing.
    assert records[-1]["test_accuracy"] < 0.3
