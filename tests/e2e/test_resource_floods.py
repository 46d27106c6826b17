"""Callers that try to hold the coordinator's resources without taking part: floods of health
Watch streams from a certificate the CA signed but the federation does not allow, and floods of
TCP connections that never start their TLS handshake. A real `fedlink server` process with real
clients keeps training through both."""

from __future__ import annotations

import os
import resource
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import grpc
from conftest import wait_for_file
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_fault_tolerance import _records, _rounds_done, _rss_mib, _wait_until
from test_federation_run import TASKS_DIR, _client, _kill_all, _log, _server

from fedlink.server.memory import TRIM_INTERVAL_SECONDS

Process = Any
HONEST = ("site-a", "site-b")
WATCH_FLOOD = 640
CONNECTION_FLOOD = 2400


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def _fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _federation(pki: Any, tmp_path: Path, **settings: object) -> tuple[Process, list[Process], str]:
    """A coordinator and the honest clients; local training takes 1 s more than digits' own, so
    that a round lasts about as long as in a real federation and slowdowns show."""
    env = {
        "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")]),
        "SLOW_TRAIN_SECONDS": "1",
    }
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        env,
        task="slow_digits_task",
        evaluate_every=0,
        listen="127.0.0.1:0",
        address_file=address_file,
        min_clients=2,
        min_fit_clients=2,
        allowed_clients=",".join([*HONEST, "monitor"]),
        **settings,
    )
    address = wait_for_file(address_file, server)
    clients = [
        _client(pki, tmp_path, name, address, env, task="slow_digits_task") for name in HONEST
    ]
    return server, clients, address


def _timed_check(pki: Any, address: str, name: str) -> float:
    """Seconds an honest health Check takes on a fresh connection (handshake included)."""
    with pki.channel(address, name) as channel:
        started = time.monotonic()
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        elapsed = time.monotonic() - started
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    return elapsed


def test_a_watch_flood_from_a_certificate_off_the_allow_list_holds_nothing(
    pki: Any, tmp_path: Path
) -> None:
    server, clients, address = _federation(pki, tmp_path, num_rounds=4)
    channels: list[grpc.Channel] = []
    try:
        run_dir = tmp_path / "run"
        _wait_until(lambda: _rounds_done(run_dir) >= 1, "round 1", timeout=120)
        threads_before = _threads(server.pid)
        # The stranger's certificate is signed by the federation CA, so its handshake succeeds.
        streams = []
        for _ in range(WATCH_FLOOD // 64):
            channel = pki.channel(address, "stranger")
            channels.append(channel)
            stub = health_pb2_grpc.HealthStub(channel)
            streams += [stub.Watch(health_pb2.HealthCheckRequest(), timeout=20) for _ in range(64)]
        rounds_at_flood = _rounds_done(run_dir)
        codes = [stream.code() for stream in streams]  # waits for each stream's end
        threads_during = _threads(server.pid)
        check_seconds = _timed_check(pki, address, "healthcheck")
        _wait_until(
            lambda: _rounds_done(run_dir) >= rounds_at_flood + 1, "an honest round", timeout=60
        )
        # An allowed identity gets its few Watch streams, and no more.
        monitor = pki.channel(address, "monitor")
        channels.append(monitor)
        watches = [
            health_pb2_grpc.HealthStub(monitor).Watch(health_pb2.HealthCheckRequest())
            for _ in range(6)
        ]
        outcomes = sorted(_first_answer(watch) for watch in watches)
        assert server.wait(timeout=120) == 0, _log(tmp_path, "run")
    finally:
        for channel in channels:
            channel.close()
        _kill_all([server, *clients])
    assert set(codes) == {grpc.StatusCode.PERMISSION_DENIED}, set(codes)
    assert len(codes) >= 600
    assert check_seconds < 1.0, check_seconds
    assert threads_during <= threads_before + 16, (threads_before, threads_during)
    assert outcomes == ["RESOURCE_EXHAUSTED"] * 2 + ["SERVING"] * 4
    assert [r["clients_accepted"] for r in _records(run_dir)] == [2, 2, 2, 2]


def _first_answer(watch: Any) -> str:
    """The first status a Watch stream reports, or the gRPC code that ended it."""
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status))
    except grpc.RpcError as error:
        return str(error.code().name)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= needed, "raise `ulimit -n`"


def _silent_connections(address: str, count: int) -> list[socket.socket]:
    """TCP connections that never send a byte: no TLS ClientHello, no handshake."""
    host, port = address.rsplit(":", 1)
    sockets = []
    for _ in range(count):
        connection = socket.socket()
        connection.setblocking(False)
        connection.connect_ex((host, int(port)))
        sockets.append(connection)
    return sockets


def _round_seconds(run_dir: Path, rounds: range) -> float:
    records = {r["round"]: r["seconds"] for r in _records(run_dir)}
    return statistics.median(records[n] for n in rounds)


def _lowest_rss(pid: int, seconds: float) -> float:
    deadline = time.monotonic() + seconds
    samples = [_rss_mib(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.05)
        samples.append(_rss_mib(pid))
    return min(samples)


def test_connections_that_never_handshake_are_cut_off_and_rounds_keep_their_speed(
    pki: Any, tmp_path: Path
) -> None:
    _raise_fd_limit(CONNECTION_FLOOD + 1024)
    server, clients, address = _federation(
        pki, tmp_path, num_rounds=30, handshake_timeout_seconds=3, max_connections=1024
    )
    sockets: list[socket.socket] = []
    try:
        run_dir = tmp_path / "run"
        _wait_until(lambda: _rounds_done(run_dir) >= 2, "round 2", timeout=120)
        baseline_rss = _lowest_rss(server.pid, 3)
        start = _rounds_done(run_dir)
        _wait_until(lambda: _rounds_done(run_dir) >= start + 3, "3 quiet rounds", timeout=60)
        quiet = _round_seconds(run_dir, range(start + 1, start + 4))
        sockets = _silent_connections(address, CONNECTION_FLOOD)
        flood_start = _rounds_done(run_dir)
        time.sleep(1)
        fds_during = _fds(server.pid)
        _wait_until(lambda: _rounds_done(run_dir) >= flood_start + 3, "3 rounds in the flood")
        flooded = _round_seconds(run_dir, range(flood_start + 1, flood_start + 4))
        # The handshake timeout (3 s) closes every silent connection, though the client holds on.
        _wait_until(lambda: _fds(server.pid) <= 200, "silent connections closed", timeout=30)
        fds_after_timeout = _fds(server.pid)
        for connection in sockets:
            connection.close()
        sockets = []
        # Over one interval of the coordinator's malloc_trim (server/memory.py).
        after_rss = _lowest_rss(server.pid, TRIM_INTERVAL_SECONDS + 2)
        check_seconds = _timed_check(pki, address, "healthcheck")
    finally:
        for connection in sockets:
            connection.close()
        _kill_all([server, *clients])
    # Log the numbers: on a shared machine they are worth reading when the test fails.
    print(
        f"round s quiet {quiet:.2f} flooded {flooded:.2f}; fds during {fds_during} after "
        f"{fds_after_timeout}; RSS MiB {baseline_rss:.0f} -> {after_rss:.0f}"
    )
    assert fds_during <= 1024 + 200, fds_during  # max_connections, plus files and pipes
    assert fds_after_timeout <= 200, fds_after_timeout
    assert flooded <= max(1.5 * quiet, quiet + 0.5), (quiet, flooded)
    assert after_rss <= baseline_rss + 64, (baseline_rss, after_rss)
    assert check_seconds < 1.0, check_seconds
