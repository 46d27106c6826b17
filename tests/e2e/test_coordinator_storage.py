"""The coordinator's own resources, with real processes: a state directory on a file system that
fills up (a real tmpfs), and a port or state directory another coordinator already holds."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import wait_for_file
from test_fault_tolerance import QUICK_RECONNECT, _records, _wait_until
from test_federation_run import TASKS_DIR, _client, _free_port, _kill_all, _log, _server

Process = subprocess.Popen[bytes]
EXIT_STORAGE_FAILURE = 75


@contextlib.contextmanager
def _tiny_file_system(path: Path, size: str = "4m") -> Iterator[Path]:
    """A real tmpfs of `size` at `path` (root only), unmounted afterwards."""
    path.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path) -> Path:
    """Write a file until the file system is full; return it (delete it to make room)."""
    filler = directory / "filler"
    block = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as f:
        while True:
            try:
                f.write(block)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    # The last partial block: fill what is left byte-wise coarse enough to be quick.
    with open(filler, "ab", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 512)
    return filler


def _slow_env(seconds: float) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")]),
        "SLOW_TRAIN_SECONDS": str(seconds),
    }


def test_a_full_disk_during_uploads_makes_clients_back_off_and_the_round_goes_on_once_freed(
    pki: Any, tmp_path: Path
) -> None:
    with _tiny_file_system(tmp_path / "state") as state_dir:
        address_file = tmp_path / "address"
        server = _server(
            pki,
            tmp_path,
            "run",
            listen="127.0.0.1:0",
            address_file=address_file,
            state_dir=state_dir,
            num_rounds=2,
            min_clients=2,
            min_fit_clients=2,
            evaluate_every=0,
            round_timeout_seconds=120,
        )
        clients: list[Process] = []
        try:
            address = wait_for_file(address_file, server)
            filler = _fill(state_dir)  # after the initial global model, before any upload
            clients = [
                _client(
                    pki,
                    tmp_path,
                    f"site-{i}",
                    address,
                    partition="iid",
                    partition_index=i,
                    num_partitions=2,
                )
                for i in range(2)
            ]
            _wait_until(
                lambda: all(
                    "coordinator disk full" in _log(tmp_path, f"site-{i}") for i in range(2)
                ),
                "both clients to be told the coordinator's disk is full",
                timeout=120,
            )
            time.sleep(8)  # the disk stays full a while: the clients must back off, not storm
            filler.unlink()
            assert server.wait(timeout=120) == 0, _log(tmp_path, "run")
            for client in clients:
                assert client.wait(timeout=60) == 0
        finally:
            _kill_all([server, *clients])
        log = _log(tmp_path, "run")
        assert "Traceback" not in log and "UNKNOWN" not in log
        # One line about the full disk per minute, not one per refused upload.
        assert 1 <= log.count("coordinator disk full") <= 2, log
        # Backing off: each client kept its result and sent it again a few times in ~10 s of
        # full disk, instead of pulling and training the task again (150+ times a round before).
        for i in range(2):
            assert f"handing the task to site-{i} again" not in log, log
            retries = _log(tmp_path, f"site-{i}").count("RESOURCE_EXHAUSTED: coordinator disk full")
            assert 1 <= retries <= 10, _log(tmp_path, f"site-{i}")
        assert [r["round"] for r in _records(tmp_path / "run")] == [1, 2]


def test_a_full_disk_when_the_model_is_written_keeps_the_last_checkpoint_and_a_restart_resumes(
    pki: Any, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{_free_port()}"
    with _tiny_file_system(tmp_path / "state") as state_dir:
        settings: dict[str, Any] = {
            "listen": address,
            "task": "slow_digits_task",
            "state_dir": state_dir,
            "run_dir": tmp_path / "run",
            "num_rounds": 2,
            "min_clients": 2,
            "min_fit_clients": 2,
            "min_results": 1,
            "round_timeout_seconds": 6,
            "evaluate_every": 0,
        }
        fast, slow = _slow_env(0), _slow_env(15)
        first = _server(pki, tmp_path, "first", fast, verbose=True, **settings)
        clients: list[Process] = []
        second: Process | None = None
        try:
            options = {"task": "slow_digits_task", "partition": "iid", "num_partitions": 2}
            clients = [
                _client(
                    pki,
                    tmp_path,
                    "site-0",
                    address,
                    fast,
                    partition_index=0,
                    **options,
                    **QUICK_RECONNECT,
                ),
                _client(
                    pki,
                    tmp_path,
                    "site-1",
                    address,
                    slow,
                    partition_index=1,
                    **options,
                    **QUICK_RECONNECT,
                ),
            ]
            # Round 1 closes at its deadline with the fast client's update; round 2 is the same,
            # except that the disk is full when its model is written.
            _wait_until(
                lambda: _log(tmp_path, "first").count("accepted train result from site-0") >= 2,
                "round 2's update from the fast client",
                timeout=120,
            )
            filler = _fill(state_dir)
            assert first.wait(timeout=60) == EXIT_STORAGE_FAILURE, _log(tmp_path, "first")
            log = _log(tmp_path, "first")
            assert "Traceback" not in log
            errors = [line for line in log.splitlines() if "cannot use its state directory" in line]
            assert len(errors) == 1, log
            assert "stopping in round 2" in errors[0] and "checkpoint (round 1)" in errors[0]
            # Nobody was told the federation finished: both clients are still there, retrying.
            assert all(c.poll() is None for c in clients)
            assert not any("federation finished" in _log(tmp_path, f"site-{i}") for i in range(2))
            assert not list(state_dir.glob("*.tmp"))  # a failed write leaves no half file

            filler.unlink()
            second = _server(pki, tmp_path, "second", fast, **settings)
            assert second.wait(timeout=180) == 0, _log(tmp_path, "second")
            assert "resuming after round 1" in _log(tmp_path, "second")
            for client in clients:
                assert client.wait(timeout=60) == 0
        finally:
            _kill_all([first, second, *clients])
    assert [r["round"] for r in _records(tmp_path / "run")] == [1, 2]
    final = safetensors.torch.load_file(str(tmp_path / "run" / "final_model.safetensors"))
    assert all(torch.isfinite(t.float()).all() for t in final.values())


def test_a_second_coordinator_on_the_same_port_refuses_to_start(pki: Any, tmp_path: Path) -> None:
    address_file = tmp_path / "address"
    first = _server(pki, tmp_path, "first", listen="127.0.0.1:0", address_file=address_file)
    try:
        address = wait_for_file(address_file, first)
        second = _server(pki, tmp_path, "second", listen=address)
        assert second.wait(timeout=60) == 2
        log = _log(tmp_path, "second")
        assert f"cannot listen on {address}: the address is in use" in log
        assert "Traceback" not in log
        assert first.poll() is None
    finally:
        _kill_all([first])


def test_one_state_dir_holds_one_live_coordinator_and_a_dead_ones_lock_is_taken_over(
    pki: Any, tmp_path: Path
) -> None:
    state = {"state_dir": tmp_path / "shared-state", "listen": "127.0.0.1:0"}
    first = _server(pki, tmp_path, "first", address_file=tmp_path / "first.address", **state)
    second: Process | None = None
    third: Process | None = None
    try:
        wait_for_file(tmp_path / "first.address", first)
        second = _server(pki, tmp_path, "second", **state)
        assert second.wait(timeout=60) == 2
        log = _log(tmp_path, "second")
        assert f"is in use by another coordinator (pid {first.pid} on" in log, log
        assert "Traceback" not in log
        assert first.poll() is None  # and its files are untouched
        assert list((tmp_path / "shared-state").glob("global-*.safetensors"))

        first.send_signal(signal.SIGKILL)
        first.wait()
        third = _server(pki, tmp_path, "third", address_file=tmp_path / "third.address", **state)
        wait_for_file(tmp_path / "third.address", third)
        log = _log(tmp_path, "third")
        assert "taking over from a coordinator that did not stop cleanly" in log
        assert f"pid {first.pid} on" in log
    finally:
        _kill_all([first, second, third])
