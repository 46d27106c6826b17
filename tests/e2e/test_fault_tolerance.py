"""Training through failures, with real processes and real signals: clients killed mid-upload,
clients that never answer, coordinators killed and restarted, corrupted checkpoints, and a
seeded chaos run that must end with the same bytes as an undisturbed one."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from conftest import wait_for_file
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_federation_run import TASKS_DIR, _client, _free_port, _kill_all, _log, _server

from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

Process = subprocess.Popen[bytes]

# Fast failure detection for tests: heartbeats every 0.5 s, silent for 3 s = gone.
LIVENESS = {"heartbeat_interval_seconds": 0.5, "liveness_timeout_seconds": 3}
QUICK_RECONNECT = {"reconnect_max_delay_seconds": 1}


def _wait_until(
    condition: Callable[[], bool], what: str, timeout: float = 180, poll: float = 0.05
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def _rounds_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count("\n") if metrics.exists() else 0


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _lowest_rss_mib_until(
    pid: int, condition: Callable[[], bool], what: str, poll: float = 0.01
) -> float:
    """The least resident memory of `pid` seen until `condition` holds. A leak stays in every
    sample; the buffers of a transfer in progress (100 MB models here) come and go."""
    samples = [_rss_mib(pid)]

    def sampled_condition() -> bool:
        samples.append(_rss_mib(pid))
        return condition()

    _wait_until(sampled_condition, what, poll=poll)
    return min(samples)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


def _metric(text: str, name: str, labels: str = "") -> float:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_a_client_killed_mid_upload_does_not_hold_up_the_round_or_leak_memory(
    pki: Any, tmp_path: Path
) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")]),
        "BIG_MODEL_WIDTH": "1581",  # 25M parameters: a 100 MB upload takes a moment
        # glibc raises its mmap threshold after freeing large blocks and then keeps freed
        # chunk buffers in the heap: 0 to 80 MiB of resident memory that comes and goes by
        # chance and would hide (or fake) a leak. A fixed threshold returns them at once.
        "MALLOC_MMAP_THRESHOLD_": "131072",
    }
    address_file = tmp_path / "address"
    metrics_port = _free_port()
    server = _server(
        pki,
        tmp_path,
        "run",
        env,
        listen="127.0.0.1:0",
        address_file=address_file,
        task="big_model_task",
        num_rounds=5,
        min_clients=3,
        min_fit_clients=2,
        evaluate_every=0,
        metrics_listen=f"127.0.0.1:{metrics_port}",
        verbose=True,
        **LIVENESS,
    )
    clients: list[Process] = []
    try:
        address = wait_for_file(address_file, server)
        clients = [
            _client(pki, tmp_path, name, address, env, task="big_model_task")
            for name in ("steady-1", "steady-2", "victim")
        ]
        run_dir = tmp_path / "run"
        _wait_until(lambda: _rounds_done(run_dir) >= 1, "round 1")
        # Kill the victim while it uploads its 100 MB in round 2: once the coordinator has the
        # upload's header (its own debug line says so), not merely once the client means to send.
        # Memory is measured over the same stretch of a round before and after the kill.
        baseline = _lowest_rss_mib_until(
            server.pid,
            lambda: "receiving train result from victim (round 2)" in _log(tmp_path, "run"),
            "the victim's upload",
            poll=0.005,
        )
        clients[2].kill()
        clients[2].wait()
        _wait_until(lambda: _rounds_done(run_dir) >= 3, "rounds 2 and 3 without the victim")
        after = _lowest_rss_mib_until(server.pid, lambda: _rounds_done(run_dir) >= 4, "round 4")
        text = _scrape(metrics_port)
        assert server.wait(timeout=300) == 0, _log(tmp_path, "run")
        for client in clients[:2]:
            assert client.wait(timeout=60) == 0
    finally:
        _kill_all([server, *clients])
    records = _records(tmp_path / "run")
    assert [r["clients_accepted"] for r in records] == [3, 2, 2, 2, 2]
    assert records[1]["clients_sampled"] == 3  # the victim was in round 2 and was dropped
    assert _metric(text, "fedlink_updates_total", '{kind="train",outcome="interrupted"}') >= 1
    assert _metric(text, "fedlink_rounds_completed_total") >= 3
    assert "no sign of life from victim" in _log(tmp_path, "run")
    assert list((tmp_path / "run-state" / "incoming").iterdir()) == []
    # Through round 4, two rounds after the kill, the coordinator's memory comes back to its
    # baseline (the model is 100 MB: a leaked upload buffer or accumulator would show).
    assert after <= baseline + 48, (baseline, after)


def test_a_client_that_never_answers_is_cut_off_at_the_deadline(pki: Any, tmp_path: Path) -> None:
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
        round_timeout_seconds=5,
        evaluate_every=0,
        **LIVENESS,
    )
    client = None
    stop = threading.Event()
    try:
        address = wait_for_file(address_file, server)
        client = _client(pki, tmp_path, "worker", address)
        # A participant that joins, takes the task and keeps heartbeating, but never answers.
        channel = pki.channel(address, "mute")
        stub = pb_grpc.FederationStub(channel)
        stub.Join(pb.JoinRequest(), timeout=10)

        def stay_alive() -> None:
            while not stop.wait(0.3):
                try:
                    stub.Heartbeat(pb.HeartbeatRequest(), timeout=5)
                except Exception:
                    return

        threading.Thread(target=stay_alive, daemon=True).start()
        task = next(iter(stub.PullTask(pb.PullTaskRequest(), timeout=60)))
        assert task.header.kind == pb.TASK_KIND_TRAIN
        assert server.wait(timeout=120) == 0, _log(tmp_path, "run")
        assert client.wait(timeout=60) == 0
    finally:
        stop.set()
        _kill_all([server, client])
    record = _records(tmp_path / "run")[0]
    assert (record["clients_sampled"], record["clients_accepted"]) == (2, 1)
    assert record["seconds"] >= 5
    assert "deadline passed; no result from mute" in _log(tmp_path, "run")


def test_a_client_training_far_longer_than_the_liveness_timeout_stays_in_the_round(
    pki: Any, tmp_path: Path
) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")]),
        "SLOW_TRAIN_SECONDS": "10",  # more than three liveness timeouts
    }
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        env,
        listen="127.0.0.1:0",
        address_file=address_file,
        task="slow_digits_task",
        num_rounds=1,
        evaluate_every=0,
        **LIVENESS,
    )
    client = None
    try:
        client = _client(
            pki, tmp_path, "slow", wait_for_file(address_file, server), env, task="slow_digits_task"
        )
        assert server.wait(timeout=120) == 0, _log(tmp_path, "run")
        assert client.wait(timeout=60) == 0
    finally:
        _kill_all([server, client])
    record = _records(tmp_path / "run")[0]
    assert record["clients_accepted"] == 1 and record["seconds"] >= 10


def test_a_coordinator_killed_mid_round_resumes_and_its_clients_come_back_by_themselves(
    pki: Any, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    state = {"run_dir": tmp_path / "run", "state_dir": tmp_path / "state", "log_format": "json"}
    settings = {"listen": address, "min_clients": 2, "min_fit_clients": 2}
    # Rounds take tens of milliseconds: the first coordinator must still be running when killed.
    first = _server(pki, tmp_path, "first", num_rounds=10_000, **settings, **state, **LIVENESS)
    clients = [
        _client(
            pki,
            tmp_path,
            f"site-{i}",
            address,
            partition_index=i,
            num_partitions=2,
            **QUICK_RECONNECT,
        )
        for i in range(2)
    ]
    second = None
    try:
        _wait_until(lambda: _rounds_done(tmp_path / "run") >= 2, "two rounds")
        first.kill()  # SIGKILL, in the middle of a round: no goodbye, no final checkpoint
        first.wait()
        done = _rounds_done(tmp_path / "run")
        total = done + 3
        second = _server(pki, tmp_path, "second", num_rounds=total, **settings, **state, **LIVENESS)
        assert second.wait(timeout=180) == 0, _log(tmp_path, "second")
        for client in clients:
            assert client.wait(timeout=60) == 0
    finally:
        _kill_all([first, second, *clients])
    assert [r["round"] for r in _records(tmp_path / "run")] == list(range(1, total + 1))
    log_lines = [
        json.loads(line) for line in _log(tmp_path, "second").splitlines() if line.startswith("{")
    ]
    messages = [entry["message"] for entry in log_lines]
    # The row of the round in progress may or may not have been written when the kill came.
    resumed = [m for m in messages if re.match(rf"resuming after round ({done}|{done + 1}) ", m)]
    assert resumed, messages
    assert {"time", "level", "logger", "message"} <= set(log_lines[0])
    for i in range(2):
        assert _log(tmp_path, f"site-{i}").count("joined federation") == 2


def test_a_corrupted_latest_checkpoint_falls_back_to_the_one_before(
    pki: Any, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    state = {"run_dir": tmp_path / "run", "state_dir": tmp_path / "state"}
    first = _server(pki, tmp_path, "first", listen=address, num_rounds=3, **state)
    client = _client(pki, tmp_path, "site", address)
    try:
        assert first.wait(timeout=120) == 0, _log(tmp_path, "first")
        assert client.wait(timeout=60) == 0
    finally:
        _kill_all([first, client])
    model = tmp_path / "state" / "global-000003.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of the latest model
    model.write_bytes(bytes(data))
    second = _server(pki, tmp_path, "second", listen=address, num_rounds=4, **state)
    client = _client(pki, tmp_path, "site-again", address)
    try:
        assert second.wait(timeout=120) == 0, _log(tmp_path, "second")
        assert client.wait(timeout=60) == 0
    finally:
        _kill_all([second, client])
    log = _log(tmp_path, "second")
    assert "round-000003.json is unusable" in log and "resuming after round 2" in log
    assert [r["round"] for r in _records(tmp_path / "run")] == [1, 2, 3, 4]


def test_sigterm_stops_both_sides_cleanly_and_a_restart_resumes(pki: Any, tmp_path: Path) -> None:
    address = f"127.0.0.1:{_free_port()}"
    state = {"run_dir": tmp_path / "run", "state_dir": tmp_path / "state"}
    # Rounds take tens of milliseconds: the first coordinator must not finish before its SIGTERM.
    first = _server(pki, tmp_path, "first", listen=address, num_rounds=10_000, **state, **LIVENESS)
    stays = _client(pki, tmp_path, "stays", address, **QUICK_RECONNECT)
    leaves = _client(pki, tmp_path, "leaves", address, **QUICK_RECONNECT)
    second = None
    try:
        _wait_until(lambda: _rounds_done(tmp_path / "run") >= 1, "round 1")
        leaves.send_signal(signal.SIGTERM)
        assert leaves.wait(timeout=30) == 0, _log(tmp_path, "leaves")
        _wait_until(lambda: _rounds_done(tmp_path / "run") >= 2, "round 2")
        statuses = _watch_health(pki, address)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, _log(tmp_path, "first")
        assert _wait_for_list(statuses, 2)[:2] == ["SERVING", "NOT_SERVING"]
        assert stays.poll() is None, "a coordinator restart must not end the clients"
        done = _rounds_done(tmp_path / "run")
        second = _server(
            pki, tmp_path, "second", listen=address, num_rounds=done + 2, **state, **LIVENESS
        )
        assert second.wait(timeout=120) == 0, _log(tmp_path, "second")
        assert stays.wait(timeout=60) == 0
    finally:
        _kill_all([first, second, stays, leaves])
    assert "received SIGTERM: left the federation" in _log(tmp_path, "leaves")
    assert "received SIGTERM" in _log(tmp_path, "first")
    assert "start again on" in _log(tmp_path, "first")
    assert [r["round"] for r in _records(tmp_path / "run")] == list(range(1, done + 3))


def _watch_health(pki: Any, address: str) -> list[str]:
    """Follow the coordinator's health status (grpc.health.v1 Watch) from a background thread.

    The watch is opened again if it fails before its first answer (a connection attempt can fail
    transiently); once it has answered, it follows until the coordinator goes away.
    """
    statuses: list[str] = []
    errors: list[str] = []
    channel = pki.channel(address, "monitor")
    stub = health_pb2_grpc.HealthStub(channel)

    def follow() -> None:
        deadline = time.monotonic() + 30
        while not statuses and time.monotonic() < deadline:
            try:
                for reply in stub.Watch(health_pb2.HealthCheckRequest(service="")):
                    statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")  # or the coordinator left
            time.sleep(0.2)
        channel.close()

    threading.Thread(target=follow, daemon=True).start()
    deadline = time.monotonic() + 40
    while not statuses:
        assert time.monotonic() < deadline, f"no health status; watch errors: {errors}"
        time.sleep(0.05)
    return statuses


def _wait_for_list(items: list[str], length: int) -> list[str]:
    _wait_until(lambda: len(items) >= length, f"{length} items", timeout=30)
    return items


def _seeded_run(
    pki: Any, tmp_path: Path, name: str, chaos: random.Random | None
) -> tuple[bytes, list[str]]:
    """A seeded 20-round federation of 3 clients; with `chaos`, the coordinator is SIGKILLed twice
    and clients several times, each restarted with the same settings."""
    root = tmp_path / name
    root.mkdir()
    address = f"127.0.0.1:{_free_port()}"
    run_dir, state_dir = root / "run", root / "state"
    server_settings = {
        "listen": address,
        "num_rounds": 20,
        "min_clients": 3,
        "min_fit_clients": 3,
        "min_results": 3,
        "below_quorum": "wait",
        "seed": 1234,
        "evaluate_every": 5,
        "run_dir": run_dir,
        "state_dir": state_dir,
        "round_timeout_seconds": 30,
        **LIVENESS,
    }
    names = [f"hospital-{i}" for i in range(3)]
    starts = dict.fromkeys(["server", *names], 0)
    events: list[str] = []

    def start(who: str) -> Process:
        starts[who] += 1
        log_name = f"{who}-{starts[who]}"
        if who == "server":
            return _server(pki, root, log_name, **server_settings)
        # The same certificate (identity) and data on every restart; its log is overwritten.
        return _client(
            pki,
            root,
            who,
            address,
            partition="dirichlet:0.5",
            partition_index=names.index(who),
            num_partitions=3,
            seed=7,
            **QUICK_RECONNECT,
        )

    processes: dict[str, Process] = {"server": start("server")}
    for who in names:
        processes[who] = start(who)
    try:
        if chaos is not None:
            server_kills = sorted(chaos.sample(range(3, 17), 2))
            client_kills = sorted(chaos.sample(range(2, 18), 5))
            while server_kills or client_kills:
                done = _rounds_done(run_dir)
                if server_kills and done >= server_kills[0]:
                    server_kills.pop(0)
                    time.sleep(chaos.uniform(0, 0.05))  # somewhere inside the next round
                    processes["server"].kill()
                    processes["server"].wait()
                    events.append(f"server killed after round {_rounds_done(run_dir)}")
                    processes["server"] = start("server")
                elif client_kills and done >= client_kills[0]:
                    client_kills.pop(0)
                    who = chaos.choice(names)
                    time.sleep(chaos.uniform(0, 0.05))
                    processes[who].kill()
                    processes[who].wait()
                    events.append(f"{who} killed after round {_rounds_done(run_dir)}")
                    processes[who] = start(who)
                assert processes["server"].poll() is None, _log(root, f"server-{starts['server']}")
                time.sleep(0.05)
        assert processes["server"].wait(timeout=600) == 0, _log(root, f"server-{starts['server']}")
        for who in names:
            try:
                processes[who].wait(timeout=60)
            except subprocess.TimeoutExpired:
                # Restarted just after the last round ended: no coordinator left to say STOP.
                processes[who].send_signal(signal.SIGTERM)
                assert processes[who].wait(timeout=30) == 0
    finally:
        _kill_all(list(processes.values()))
    assert [r["round"] for r in _records(run_dir)] == list(range(1, 21))
    return (run_dir / "final_model.safetensors").read_bytes(), events


def test_a_seeded_run_survives_chaos_and_ends_with_the_same_bytes(pki: Any, tmp_path: Path) -> None:
    undisturbed, _ = _seeded_run(pki, tmp_path, "calm", chaos=None)
    disturbed, events = _seeded_run(pki, tmp_path, "chaos", chaos=random.Random(2026))
    assert sum("server killed" in e for e in events) == 2, events
    assert sum("hospital" in e for e in events) == 5, events
    assert disturbed == undisturbed, events
