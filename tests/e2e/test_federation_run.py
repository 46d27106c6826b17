"""Whole federations with real processes: a coordinator and client processes over mTLS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import safetensors
import torch
from conftest import fedlink_process, wait_for_file

TASKS_DIR = Path(__file__).parent / "tasks"


def test_the_demo_federation_converges_and_leaves_its_results(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedlink",
            "demo",
            "--clients",
            "5",
            "--rounds",
            "30",
            "--partition",
            "classes:2",
            "--run-dir",
            str(run_dir),
            "--min-accuracy",
            "0.87",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, 31))
    assert all(r["clients_accepted"] == 5 and r["clients_sampled"] == 5 for r in records)
    assert records[-1]["test_accuracy"] >= 0.87
    assert records[-1]["federated_accuracy"] is not None
    assert all(r["bytes_down"] > 0 and r["bytes_up"] > 0 for r in records)
    assert "final test accuracy" in result.stdout
    with safetensors.safe_open(str(run_dir / "final_model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    assert (run_dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for log in (run_dir / "logs").glob("client-*.log"):
        assert "federation finished; exiting" in log.read_text()


def _start_federation(
    pki: Any,
    tmp_path: Path,
    rounds: int,
    clients: int,
    task: str = "digits",
    extra_env: dict[str, str] | None = None,
    **server_flags: str,
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]], Path]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    address_file = run_dir / "address"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in server_flags.items()]
    server = fedlink_process(
        [
            "server",
            "--listen",
            "127.0.0.1:0",
            "--address-file",
            str(address_file),
            "--cert",
            str(pki.server_dir / "server.pem"),
            "--key",
            str(pki.server_dir / "server.key"),
            "--ca",
            str(pki.server_dir / "ca.pem"),
            "--task",
            task,
            "--num-rounds",
            str(rounds),
            "--min-clients",
            str(clients),
            "--min-fit-clients",
            str(clients),
            "--heartbeat-interval-seconds",
            "1",
            "--run-dir",
            str(run_dir),
            "--state-dir",
            str(tmp_path / "state"),
            *flags,
        ],
        run_dir / "server.log",
        extra_env,
    )
    address = wait_for_file(address_file, server)
    processes = []
    for index in range(clients):
        cert, key, ca = pki.client(f"site-{index}")
        processes.append(
            fedlink_process(
                [
                    "client",
                    "--server",
                    address,
                    "--cert",
                    str(cert),
                    "--key",
                    str(key),
                    "--ca",
                    str(ca),
                    "--task",
                    task,
                    "--partition",
                    "iid",
                    "--partition-index",
                    str(index),
                    "--num-partitions",
                    str(clients),
                ],
                run_dir / f"client-{index}.log",
                extra_env,
            )
        )
    return server, processes, run_dir


def _kill_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_stops_the_coordinator_cleanly_and_clients_exit(pki: Any, tmp_path: Path) -> None:
    server, clients, run_dir = _start_federation(pki, tmp_path, rounds=10_000, clients=2)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert time.monotonic() < deadline, "no round completed"
            assert server.poll() is None, (run_dir / "server.log").read_text()
            time.sleep(0.2)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, (run_dir / "server.log").read_text()
        assert (run_dir / "final_model.safetensors").exists()
        for client in clients:
            assert client.wait(timeout=60) == 0
    finally:
        _kill_all([server, *clients])
    assert "received SIGTERM" in (run_dir / "server.log").read_text()


def test_a_100_million_parameter_model_makes_a_round_trip(pki: Any, tmp_path: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")])}
    server, clients, run_dir = _start_federation(
        pki,
        tmp_path,
        rounds=1,
        clients=1,
        task="big_model_task",
        extra_env=env,
        evaluate_every="0",
    )
    try:
        assert server.wait(timeout=600) == 0, (run_dir / "server.log").read_text()
        assert clients[0].wait(timeout=60) == 0, (run_dir / "client-0.log").read_text()
    finally:
        _kill_all([server, *clients])
    sys.path.insert(0, str(TASKS_DIR))
    try:
        import big_model_task
    finally:
        sys.path.remove(str(TASKS_DIR))
    torch.manual_seed(0)  # the coordinator's default seed builds the same initial model
    initial = big_model_task.build_model().state_dict()
    assert sum(t.numel() for t in initial.values()) >= 100_000_000
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["bytes_down"] >= 400_000_000 and record["bytes_up"] >= 400_000_000
    with safetensors.safe_open(str(run_dir / "final_model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(initial)
        for name, tensor in initial.items():
            assert torch.equal(f.get_tensor(name), tensor + 1.0), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_client_started_before_the_coordinator_keeps_retrying_and_joins(
    pki: Any, tmp_path: Path
) -> None:
    port = _free_port()
    cert, key, ca = pki.client("early-bird")
    client = fedlink_process(
        [
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--ca",
            str(ca),
            "--task",
            "digits",
        ],
        tmp_path / "client.log",
    )
    server = None
    try:
        deadline = time.monotonic() + 60
        while "retrying in" not in (tmp_path / "client.log").read_text():
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.2)
        server = fedlink_process(
            [
                "server",
                "--listen",
                f"127.0.0.1:{port}",
                "--cert",
                str(pki.server_dir / "server.pem"),
                "--key",
                str(pki.server_dir / "server.key"),
                "--ca",
                str(pki.server_dir / "ca.pem"),
                "--num-rounds",
                "2",
                "--min-clients",
                "1",
                "--min-fit-clients",
                "1",
                "--run-dir",
                str(tmp_path / "run"),
                "--state-dir",
                str(tmp_path / "state"),
            ],
            tmp_path / "server.log",
        )
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()
        assert client.wait(timeout=60) == 0, (tmp_path / "client.log").read_text()
    finally:
        _kill_all([p for p in (client, server) if p is not None])
    assert "joined federation" in (tmp_path / "client.log").read_text()


def test_insecure_mode_works_only_when_asked_for_and_says_so_loudly(tmp_path: Path) -> None:
    address_file = tmp_path / "address"
    server = fedlink_process(
        [
            "server",
            "--insecure",
            "--listen",
            "127.0.0.1:0",
            "--address-file",
            str(address_file),
            "--num-rounds",
            "1",
            "--min-clients",
            "1",
            "--min-fit-clients",
            "1",
            "--run-dir",
            str(tmp_path / "run"),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        tmp_path / "server.log",
    )
    client = None
    try:
        address = wait_for_file(address_file, server)
        client = fedlink_process(
            ["client", "--insecure", "--server", address, "--task", "digits"],
            tmp_path / "client.log",
        )
        assert server.wait(timeout=120) == 0, (tmp_path / "server.log").read_text()
        assert client.wait(timeout=60) == 0, (tmp_path / "client.log").read_text()
    finally:
        _kill_all([p for p in (client, server) if p is not None])
    assert "INSECURE MODE" in (tmp_path / "server.log").read_text()
    assert "INSECURE MODE" in (tmp_path / "client.log").read_text()
    assert "joined federation" in (tmp_path / "client.log").read_text()


def test_clients_rejoin_a_restarted_coordinator_by_themselves(pki: Any, tmp_path: Path) -> None:
    port = _free_port()

    def coordinator(rounds: int, name: str) -> subprocess.Popen[bytes]:
        return fedlink_process(
            [
                "server",
                "--listen",
                f"127.0.0.1:{port}",
                "--cert",
                str(pki.server_dir / "server.pem"),
                "--key",
                str(pki.server_dir / "server.key"),
                "--ca",
                str(pki.server_dir / "ca.pem"),
                "--num-rounds",
                str(rounds),
                "--min-clients",
                "1",
                "--min-fit-clients",
                "1",
                "--heartbeat-interval-seconds",
                "1",
                "--run-dir",
                str(tmp_path / name),
                "--state-dir",
                str(tmp_path / "state"),
            ],
            tmp_path / f"{name}.log",
        )

    first = coordinator(10_000, "first")
    cert, key, ca = pki.client("survivor")
    client = fedlink_process(
        [
            "client",
            "--server",
            f"127.0.0.1:{port}",
            "--cert",
            str(cert),
            "--key",
            str(key),
            "--ca",
            str(ca),
            "--task",
            "digits",
        ],
        tmp_path / "client.log",
    )
    second = None
    try:
        metrics = tmp_path / "first" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.2)
        first.kill()  # SIGKILL: no goodbye to the client
        first.wait()
        second = coordinator(2, "second")
        assert second.wait(timeout=180) == 0, (tmp_path / "second.log").read_text()
        assert client.wait(timeout=60) == 0, (tmp_path / "client.log").read_text()
    finally:
        _kill_all([p for p in (first, client, second) if p is not None])
    assert (tmp_path / "client.log").read_text().count("joined federation") == 2
