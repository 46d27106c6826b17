"""Whole federations with real processes: a coordinator and client processes over mTLS."""

from __future__ import annotations

import json
import os
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


def _flags(**values: object) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]


def _server(
    pki: Any | None,
    tmp: Path,
    name: str,
    env: dict[str, str] | None = None,
    *,
    verbose: bool = False,
    **settings: object,
) -> subprocess.Popen[bytes]:
    """`fedlink server` with the test federation's bundle (None: --insecure), run dir tmp/name;
    `verbose` adds debug lines to the log."""
    if pki is None:
        tls = ["--insecure"]
    else:
        bundle = pki.server_dir
        tls = _flags(cert=bundle / "server.pem", key=bundle / "server.key", ca=bundle / "ca.pem")
    defaults: dict[str, object] = {
        "min_clients": 1,
        "min_fit_clients": 1,
        "heartbeat_interval_seconds": 1,
        "run_dir": tmp / name,
        "state_dir": tmp / f"{name}-state",
    }
    arguments = [*(["--verbose"] if verbose else []), "server", *tls]
    arguments += _flags(**{**defaults, **settings})
    return fedlink_process(arguments, tmp / f"{name}.log", env)


def _client(
    pki: Any | None,
    tmp: Path,
    name: str,
    server: str,
    env: dict[str, str] | None = None,
    **settings: object,
) -> subprocess.Popen[bytes]:
    """`fedlink client` with its own certificate (None: --insecure), logging to tmp/name.log."""
    if pki is None:
        tls = ["--insecure"]
    else:
        cert, key, ca = pki.client(name)
        tls = _flags(cert=cert, key=key, ca=ca)
    arguments = ["client", *tls, *_flags(server=server, **{"task": "digits", **settings})]
    return fedlink_process(arguments, tmp / f"{name}.log", env)


def _start_federation(
    pki: Any,
    tmp_path: Path,
    rounds: int,
    clients: int,
    task: str = "digits",
    env: dict[str, str] | None = None,
    **server_settings: object,
) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]], Path]:
    run_dir = tmp_path / "run"
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        env,
        listen="127.0.0.1:0",
        address_file=address_file,
        task=task,
        num_rounds=rounds,
        min_clients=clients,
        min_fit_clients=clients,
        **server_settings,
    )
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
    return server, processes, run_dir


def _kill_all(processes: list[subprocess.Popen[bytes] | None]) -> None:
    for process in processes:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def _log(tmp: Path, name: str) -> str:
    return (tmp / f"{name}.log").read_text()


def test_a_100_million_parameter_model_makes_a_round_trip(pki: Any, tmp_path: Path) -> None:
    env = {"PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")])}
    server, clients, run_dir = _start_federation(
        pki,
        tmp_path,
        rounds=1,
        clients=1,
        task="big_model_task",
        env=env,
        evaluate_every=0,
    )
    try:
        assert server.wait(timeout=600) == 0, _log(tmp_path, "run")
        assert clients[0].wait(timeout=60) == 0, _log(tmp_path, "site-0")
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
            assert torch.equal(f.get_tensor(name), tensor + big_model_task.STEP), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_client_started_before_the_coordinator_keeps_retrying_and_joins(
    pki: Any, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    client = _client(pki, tmp_path, "early-bird", address)
    server = None
    try:
        deadline = time.monotonic() + 60
        while "retrying in" not in _log(tmp_path, "early-bird"):
            assert time.monotonic() < deadline and client.poll() is None
            time.sleep(0.2)
        server = _server(pki, tmp_path, "server", listen=address, num_rounds=2)
        assert server.wait(timeout=120) == 0, _log(tmp_path, "server")
        assert client.wait(timeout=60) == 0, _log(tmp_path, "early-bird")
    finally:
        _kill_all([client, server])
    assert "joined federation" in _log(tmp_path, "early-bird")


def test_insecure_mode_works_only_when_asked_for_and_says_so_loudly(tmp_path: Path) -> None:
    address_file = tmp_path / "address"
    server = _server(
        None, tmp_path, "server", listen="127.0.0.1:0", address_file=address_file, num_rounds=1
    )
    client = None
    try:
        client = _client(None, tmp_path, "dev", wait_for_file(address_file, server))
        assert server.wait(timeout=120) == 0, _log(tmp_path, "server")
        assert client.wait(timeout=60) == 0, _log(tmp_path, "dev")
    finally:
        _kill_all([client, server])
    assert "INSECURE MODE" in _log(tmp_path, "server")
    assert "INSECURE MODE" in _log(tmp_path, "dev")
    assert "joined federation" in _log(tmp_path, "dev")


def test_clients_rejoin_a_restarted_coordinator_by_themselves(pki: Any, tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    first = _server(pki, tmp_path, "first", listen=address, num_rounds=10_000)
    client = _client(pki, tmp_path, "survivor", address)
    second = None
    try:
        metrics = tmp_path / "first" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline, _log(tmp_path, "first")
            time.sleep(0.2)
        first.kill()  # SIGKILL: no goodbye to the client
        first.wait()
        second = _server(pki, tmp_path, "second", listen=address, num_rounds=2)
        assert second.wait(timeout=180) == 0, _log(tmp_path, "second")
        assert client.wait(timeout=60) == 0, _log(tmp_path, "survivor")
    finally:
        _kill_all([first, client, second])
    assert _log(tmp_path, "survivor").count("joined federation") == 2
