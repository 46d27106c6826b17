"""Waiting clients cost the coordinator no threads: a real `fedlink server` holds 2,000 idle long
polls, opened all at once, while a real round completes, and its thread count stays where it
was without them.

2,000 at once is past gRPC core's default queue of calls not yet taken up (1,000), where core
cancelled calls at random until the coordinator sized that queue to its `max_concurrent_rpcs`
(server/transport.py)."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from conftest import wait_for_file
from test_fault_tolerance import _rounds_done, _wait_until
from test_federation_run import TASKS_DIR, _client, _kill_all, _log, _server

from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

IDLE_POLLS = 2000
CHANNELS = 4
# What the coordinator may use whatever the number of waiting clients: the event loop, the
# workers (one per CPU), the round loop, gRPC's and torch's own threads, TensorBoard's writer.
MAX_THREADS = 64


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


def test_two_thousand_idle_long_polls_hold_no_threads_while_a_round_completes(
    pki: Any, tmp_path: Path
) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")]),
        "SLOW_TRAIN_SECONDS": "8",  # the round stays open while the idle polls are measured
    }
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        env,
        task="slow_digits_task",
        evaluate_every=0,
        num_rounds=1,
        listen="127.0.0.1:0",
        address_file=address_file,
        min_clients=2,
        min_fit_clients=2,
        round_timeout_seconds=120,
        # One identity holds all the polls: its own limits must let it.
        max_calls_per_client=IDLE_POLLS + 10,
        rate_limit_burst=IDLE_POLLS + 10,
        rate_limit_per_second=IDLE_POLLS,
    )
    processes: list[Any] = [server]
    channels: list[grpc.Channel] = []
    try:
        address = wait_for_file(address_file, server)
        processes += [
            _client(pki, tmp_path, name, address, env, task="slow_digits_task")
            for name in ("site-a", "site-b")
        ]
        _wait_until(
            lambda: all("joined federation" in _log(tmp_path, n) for n in ("site-a", "site-b")),
            "both clients to join",
            timeout=120,
        )
        time.sleep(2)  # the round loop samples the two within 0.5 s; the idler joins after
        before = _threads(server.pid)
        channels = [pki.channel(address, "idler") for _ in range(CHANNELS)]
        stubs = [pb_grpc.FederationStub(channel) for channel in channels]
        stubs[0].Join(pb.JoinRequest(), timeout=30)
        polls = [
            stubs[i % CHANNELS].PullTask(pb.PullTaskRequest(), timeout=300)
            for i in range(IDLE_POLLS)
        ]
        peak = before
        held = 0
        while _rounds_done(tmp_path / "run") < 1:
            assert server.poll() is None, _log(tmp_path, "run")
            peak = max(peak, _threads(server.pid))
            held = max(held, sum(1 for call in polls if not call.done()))
            time.sleep(0.05)
        # The idler was not sampled (it joined after round 1 started): every poll stayed open.
        ended = Counter(call.code().name for call in polls if call.done())
        assert held == IDLE_POLLS, f"only {held} of {IDLE_POLLS} polls were held open: {ended}"
        assert peak <= MAX_THREADS, f"{peak} threads with {IDLE_POLLS} idle polls"
        print(f"coordinator threads: {before} before the idle polls, {peak} at most with them")
        # The run is over: the idle polls are answered STOP, and the coordinator exits cleanly.
        kinds = {next(iter(call)).header.kind for call in polls[:50]}
        assert kinds == {pb.TASK_KIND_STOP}
        assert server.wait(timeout=60) == 0, _log(tmp_path, "run")
    finally:
        for channel in channels:
            channel.close()
        _kill_all(processes)
