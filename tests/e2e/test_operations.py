"""What an operator sees while a federation starts: real processes over mTLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import wait_for_file
from test_fault_tolerance import _wait_until
from test_federation_run import _client, _kill_all, _log, _server


def test_the_coordinator_says_how_many_clients_round_one_still_waits_for(
    pki: Any, tmp_path: Path
) -> None:
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
        evaluate_every=0,
    )
    clients = []
    try:
        address = wait_for_file(address_file, server)
        _wait_until(
            lambda: (
                "round 1: waiting for 2 more client(s) (0 of 2 connected)" in _log(tmp_path, "run")
            ),
            "the first waiting line",
            timeout=60,
        )
        clients.append(_client(pki, tmp_path, "site-0", address, threads=1))
        _wait_until(
            lambda: (
                "round 1: waiting for 1 more client(s) (1 of 2 connected)" in _log(tmp_path, "run")
            ),
            "the line after one client joined",
            timeout=120,
        )
        clients.append(_client(pki, tmp_path, "site-1", address))
        assert server.wait(timeout=120) == 0, _log(tmp_path, "run")
        assert all(client.wait(timeout=60) == 0 for client in clients)
    finally:
        _kill_all([server, *clients])
    # --threads 1 is what torch computes with (the other client: OMP_NUM_THREADS=1 from the env).
    assert "client running task digits on cpu (1 CPU threads)" in _log(tmp_path, "site-0")
