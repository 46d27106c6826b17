"""Clients that cannot or will not go on say so, with real processes, certificates and signals:
a signalled client leaves and the next round does not wait for it; a task's exception reaches
the coordinator's log; a client whose model differs from the coordinator's stops at Join; the
demo stops when a client dies; an unusable state_dir is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import wait_for_file
from test_fault_tolerance import _records, _rounds_done, _wait_until
from test_federation_run import TASKS_DIR, _client, _kill_all, _log, _server

TASK = "faulty_digits_task"
ENV = {"PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")])}
# Long enough that a round waiting for a departed client would stand out.
LIVENESS_TIMEOUT = 60


def _coordinator(pki: Any, tmp_path: Path, **settings: object) -> tuple[Any, str]:
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        ENV,
        listen="127.0.0.1:0",
        address_file=address_file,
        task=TASK,
        evaluate_every=0,
        heartbeat_interval_seconds=0.5,
        liveness_timeout_seconds=LIVENESS_TIMEOUT,
        **settings,
    )
    return server, wait_for_file(address_file, server)


def test_clients_stopped_by_sigterm_and_sigint_leave_and_later_rounds_do_not_wait_for_them(
    pki: Any, tmp_path: Path
) -> None:
    server, address = _coordinator(pki, tmp_path, num_rounds=4, min_clients=3)
    names = ("stays", "sigterm", "sigint")
    # Rounds of ~1.5 s, so each signal lands while its client trains in the round.
    env = {**ENV, "FAULTY_TRAIN_SECONDS": "1.5"}
    clients = {name: _client(pki, tmp_path, name, address, env, task=TASK) for name in names}
    try:
        _wait_until(lambda: _rounds_done(tmp_path / "run") >= 1, "round 1", timeout=120)
        clients["sigterm"].send_signal(signal.SIGTERM)
        assert clients["sigterm"].wait(timeout=30) == 0, _log(tmp_path, "sigterm")
        _wait_until(lambda: _rounds_done(tmp_path / "run") >= 2, "round 2", timeout=60)
        clients["sigint"].send_signal(signal.SIGINT)
        assert clients["sigint"].wait(timeout=30) == 0, _log(tmp_path, "sigint")
        assert server.wait(timeout=60) == 0, _log(tmp_path, "run")
    finally:
        _kill_all([server, *clients.values()])
    coordinator_log = _log(tmp_path, "run")
    assert "client sigterm left" in coordinator_log and "received SIGTERM" in coordinator_log
    assert "client sigint left" in coordinator_log and "received SIGINT" in coordinator_log
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    # A round that waited for a departed client would take the liveness timeout.
    assert all(r["seconds"] < LIVENESS_TIMEOUT / 3 for r in records), records


def test_an_exception_in_the_task_s_train_reaches_the_coordinator_log_at_once(
    pki: Any, tmp_path: Path
) -> None:
    server, address = _coordinator(pki, tmp_path, num_rounds=1)
    error = "shard 7 of the local data is corrupted\nforged log line"
    client = _client(
        pki, tmp_path, "broken", address, {**ENV, "FAULTY_TRAIN_ERROR": error}, task=TASK
    )
    started = time.monotonic()
    try:
        assert client.wait(timeout=60) != 0
        _wait_until(lambda: "client broken left" in _log(tmp_path, "run"), "the leave", timeout=10)
        assert time.monotonic() - started < LIVENESS_TIMEOUT / 2
    finally:
        _kill_all([server, client])
    line = next(x for x in _log(tmp_path, "run").splitlines() if "client broken left" in x)
    # The message arrives, with its newline escaped instead of forging a second log line.
    assert "RuntimeError: shard 7 of the local data is corrupted\\nforged log line" in line
    assert "RuntimeError: shard 7" in _log(tmp_path, "broken")


def test_a_client_whose_model_differs_exits_2_at_join_naming_the_tensor(
    pki: Any, tmp_path: Path
) -> None:
    server, address = _coordinator(pki, tmp_path, num_rounds=1)
    client = _client(pki, tmp_path, "wide", address, {**ENV, "FAULTY_WIDE_OUTPUT": "12"}, task=TASK)
    try:
        assert client.wait(timeout=60) == 2, _log(tmp_path, "wide")
    finally:
        _kill_all([server, client])
    client_log = _log(tmp_path, "wide")
    assert "'fc2.bias' (float32 [10]) is missing" not in client_log  # names the real difference
    assert "'fc2.bias' is float32 [10] at the coordinator but float32 [12] here" in client_log
    assert "load_state_dict" not in client_log and "Traceback" not in client_log


def test_the_demo_stops_at_once_with_the_error_when_a_client_dies(tmp_path: Path) -> None:
    demo = ["demo", "--clients", "2", "--rounds", "50", "--task", TASK]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fedlink", *demo, "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, **ENV, "FAULTY_TRAIN_ERROR": "no data in /srv/site"},
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert time.monotonic() - started < 120
    assert "exited with status 1 before the run finished" in result.stderr
    assert "RuntimeError: no data in /srv/site" in result.stderr


def test_an_unusable_state_dir_is_one_line_and_exit_2(pki: Any, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    server = _server(pki, tmp_path, "run", state_dir=tmp_path / "a-file" / "state")
    assert server.wait(timeout=60) == 2
    lines = _log(tmp_path, "run").strip().splitlines()
    assert len(lines) == 1, lines
    assert "--state-dir" in lines[0] and "is not usable: Not a directory" in lines[0]
