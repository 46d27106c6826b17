"""A finished federation ends its clients promptly, with real processes: a coordinator started
again on a complete run (a second `docker compose up`) stays up just long enough to tell the
run's clients, which were started before it and retry until it listens, that it is over."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from test_federation_run import _client, _free_port, _kill_all, _log, _server

# The grace the coordinator would wait at most; the test expects it to end long before.
GRACE_SECONDS = 60


def _first_run(pki: Any, tmp_path: Path, address: str, state: dict[str, Path]) -> None:
    server = _server(
        pki,
        tmp_path,
        "first",
        listen=address,
        num_rounds=1,
        min_clients=2,
        min_fit_clients=2,
        **state,
    )
    clients = [_client(pki, tmp_path, f"site-{i}", address) for i in range(2)]
    try:
        assert server.wait(timeout=180) == 0, _log(tmp_path, "first")
        for i, client in enumerate(clients):
            assert client.wait(timeout=60) == 0, _log(tmp_path, f"site-{i}")
    finally:
        _kill_all([server, *clients])


def test_a_second_start_of_a_finished_run_tells_its_clients_and_everyone_exits_0(
    pki: Any, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    state = {"run_dir": tmp_path / "run", "state_dir": tmp_path / "state"}
    _first_run(pki, tmp_path, address, state)

    # As compose does without a healthcheck runner: the clients start first and retry.
    started = time.monotonic()
    clients = [
        _client(pki, tmp_path, f"site-{i}", address, reconnect_max_delay_seconds=1)
        for i in range(2)
    ]
    server = None
    try:
        server = _server(
            pki,
            tmp_path,
            "second",
            listen=address,
            num_rounds=1,
            finished_grace_seconds=GRACE_SECONDS,
            **state,
        )
        for i, client in enumerate(clients):
            assert client.wait(timeout=GRACE_SECONDS) == 0, _log(tmp_path, f"site-{i}")
        assert server.wait(timeout=GRACE_SECONDS) == 0, _log(tmp_path, "second")
        elapsed = time.monotonic() - started
    finally:
        _kill_all([server, *clients])
    # It exits once both known clients were told, not at the end of its grace period.
    assert elapsed < GRACE_SECONDS - 15, elapsed
    second = _log(tmp_path, "second")
    assert second.count("joined after the run finished; it is told so") == 2, second
    for i in range(2):
        log = _log(tmp_path, f"site-{i}")
        assert "is finished; exiting" in log, log
        assert "joined federation" not in log, log  # told at Join: no task pulled


def test_a_finished_run_waits_for_its_clients_no_longer_than_the_grace(
    pki: Any, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    state = {"run_dir": tmp_path / "run", "state_dir": tmp_path / "state"}
    _first_run(pki, tmp_path, address, state)

    # Neither client comes back: the coordinator waits for them for its grace, then exits 0.
    started = time.monotonic()
    server = _server(
        pki, tmp_path, "second", listen=address, num_rounds=1, finished_grace_seconds=5, **state
    )
    try:
        assert server.wait(timeout=60) == 0, _log(tmp_path, "second")
        elapsed = time.monotonic() - started
    finally:
        _kill_all([server])
    assert elapsed >= 5, elapsed
