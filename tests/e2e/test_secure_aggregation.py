"""Secure aggregation in real federations: coordinator and client processes over mutual TLS."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from conftest import wait_for_file
from test_federation_run import _client, _free_port, _kill_all, _log, _server

from fedlink.common.tensors import open_state_file


class Federation:
    """A coordinator and `clients` digits clients (iid shards) in `directory`."""

    def __init__(
        self, pki: Any, directory: Path, clients: int, *, secure: bool, **server: object
    ) -> None:
        self.directory = directory
        self.run_dir = directory / "run"
        self.state_dir = directory / "state"
        address_file = directory / "address"
        settings = {
            "listen": "127.0.0.1:0",
            "address_file": address_file,
            "min_clients": clients,
            "min_fit_clients": clients,
            "liveness_timeout_seconds": 3,
            "run_dir": self.run_dir,
            "state_dir": self.state_dir,
            "seed": 7,
            **server,
        }
        directory.mkdir()
        env = {"FEDLINK_SECURE_AGGREGATION": "true"} if secure else None
        self.server = _server(pki, directory, "server", env, **settings)
        self.clients: list[subprocess.Popen[bytes]] = []
        try:
            address = wait_for_file(address_file, self.server)
            self.clients = [
                _client(
                    pki,
                    directory,
                    f"site-{i}",
                    address,
                    partition="iid",
                    partition_index=i,
                    num_partitions=clients,
                )
                for i in range(clients)
            ]
        except BaseException:
            self.kill()
            raise

    def client_log(self, index: int) -> Path:
        return self.directory / f"site-{index}.log"

    def server_log(self) -> str:
        return (self.directory / "server.log").read_text()

    def finish(self, timeout: float = 300) -> list[dict[str, Any]]:
        """Wait for every process to exit 0 (killed clients aside); the metrics rows."""
        try:
            assert self.server.wait(timeout=timeout) == 0, self.server_log()
            for i, client in enumerate(self.clients):
                code = client.wait(timeout=60)
                assert code in (0, -signal.SIGKILL), self.client_log(i).read_text()
        finally:
            self.kill()
        lines = (self.run_dir / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        for process in [self.server, *self.clients]:
            if process.poll() is None:
                process.kill()
                process.wait()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    with open_state_file(path) as state:
        return {name: tensor.clone() for name, tensor in state.items()}


def test_a_secure_federation_trains_the_same_model_as_plaintext_fedavg(
    pki: Any, tmp_path: Path
) -> None:
    # Same seed, same clients, same data: the only difference is how the updates are summed.
    settings = {"num_rounds": 3, "secagg_max_weight": 1000}
    plain = Federation(pki, tmp_path / "plain", 3, secure=False, **settings)
    plain_records = plain.finish()
    secure = Federation(pki, tmp_path / "secure", 3, secure=True, **settings)
    secure_records = secure.finish()
    log = secure.server_log()
    assert log.count("secure aggregation recovered the sum of 3 of 3 clients") == 3
    assert [r["clients_accepted"] for r in secure_records] == [3, 3, 3]
    # Training loss is one client's information under secure aggregation: not reported.
    assert all(r["train_loss"] is None for r in secure_records)
    plain_model = _weights(plain.run_dir / "final_model.safetensors")
    secure_model = _weights(secure.run_dir / "final_model.safetensors")
    for name, tensor in plain_model.items():
        difference = float((tensor.double() - secure_model[name].double()).abs().max())
        assert difference < 1e-4, (name, difference)
    for p, s in zip(plain_records, secure_records, strict=True):
        assert abs(p["test_accuracy"] - s["test_accuracy"]) < 0.01
    assert secure_records[-1]["test_accuracy"] > 0.5
    # Nothing a client sent stays in the state directory: no spool, no session files.
    assert list((secure.state_dir / "incoming").iterdir()) == []
    # Per-client rows (each client's evaluation metrics among them) only without secure
    # aggregation: a row per client per round for the plain run, no file for the secure one.
    assert len((plain.run_dir / "clients.jsonl").read_text().splitlines()) == 3 * 3
    assert not (secure.run_dir / "clients.jsonl").exists()


def test_a_secagg_plus_federation_trains_the_same_model_as_plaintext_fedavg(
    pki: Any, tmp_path: Path
) -> None:
    # 5 clients with 2 neighbours each (a ring; the complete graph would give each 4): every
    # client shares keys with and masks against two others, and the sum is still exact.
    settings = {"num_rounds": 2, "secagg_max_weight": 1000}
    plain = Federation(pki, tmp_path / "plain", 5, secure=False, **settings)
    plain.finish()
    secure = Federation(pki, tmp_path / "secure", 5, secure=True, secagg_neighbours=2, **settings)
    secure_records = secure.finish()
    sparse = "(threshold 3; SecAgg+: 2 neighbours each, 2 of a client's 3 holders rebuild"
    assert secure.server_log().count(f"recovered the sum of 5 of 5 clients {sparse}") == 2
    assert [r["clients_accepted"] for r in secure_records] == [5, 5]
    plain_model = _weights(plain.run_dir / "final_model.safetensors")
    secure_model = _weights(secure.run_dir / "final_model.safetensors")
    for name, tensor in plain_model.items():
        difference = float((tensor.double() - secure_model[name].double()).abs().max())
        assert difference < 1e-4, (name, difference)


def test_a_client_killed_in_the_middle_of_a_secure_round_does_not_stop_the_federation(
    pki: Any, tmp_path: Path
) -> None:
    # 5 clients, threshold 3. site-4 is SIGKILLed in round 2 as it starts sharing its keys:
    # it advertised keys, so the others must mask against it, and its masks are removed from
    # the sum with the shares of its mask key the survivors hold (or it is left out earlier).
    # Five, so that the four left still each mask against the threshold of peers (3, not
    # counting themselves) when the victim's bundles never arrived.
    federation = Federation(pki, tmp_path / "run", 5, secure=True, num_rounds=4, min_fit_clients=4)
    victim = federation.clients[4]
    deadline = time.monotonic() + 240
    while "round 2: secagg_share_keys" not in federation.client_log(4).read_text():
        assert time.monotonic() < deadline, federation.client_log(4).read_text()
        assert victim.poll() is None
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    records = federation.finish()
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert records[0]["clients_accepted"] == 5
    assert records[1]["clients_accepted"] >= 4
    assert [r["clients_accepted"] for r in records[2:]] == [4, 4]
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"]
    log = federation.server_log()
    assert "secure aggregation failed" not in log
    assert "no sign of life from site-4" in log


def test_secure_aggregation_with_dp_splits_the_noise_across_the_clients(
    pki: Any, tmp_path: Path
) -> None:
    federation = Federation(
        pki,
        tmp_path / "run",
        3,
        secure=True,
        num_rounds=2,
        dp_clip_norm=1.0,
        dp_noise_multiplier=0.5,
        dp_delta=1e-5,
    )
    records = federation.finish()
    assert [r["clients_accepted"] for r in records] == [3, 3]
    assert 0 < records[0]["epsilon"] < records[1]["epsilon"]
    log = federation.server_log()
    assert log.count("secure aggregation recovered the sum of 3 of 3 clients") == 2
    # The coordinator adds no noise of its own: DPFedAvg's "noise std ... on the sum" line is
    # absent; every client added its share (N(0, (z S)^2 / t), t = 2) before masking.
    assert "DP: clipped" not in log
    noise = 0.5 * 1.0 / math.sqrt(2)
    for i in range(3):
        client_log = federation.client_log(i).read_text()
        assert f"DP: change clipped to norm 1, Gaussian noise of std {noise:.4g}" in client_log


def test_a_coordinator_killed_mid_secure_round_restarts_the_round_with_fresh_keys(
    pki: Any, tmp_path: Path
) -> None:
    # The session lives in the coordinator's memory only: after a SIGKILL and a restart on the
    # same state directory, the interrupted round runs again as a new session (new keys) and
    # the clients, which held the old session's secrets, follow by themselves.
    address = f"127.0.0.1:{_free_port()}"
    env = {"FEDLINK_SECURE_AGGREGATION": "true"}
    settings = {
        "listen": address,
        "min_clients": 3,
        "min_fit_clients": 3,
        "heartbeat_interval_seconds": 0.5,
        "liveness_timeout_seconds": 3,
        "run_dir": tmp_path / "run",
        "state_dir": tmp_path / "state",
    }
    first = _server(pki, tmp_path, "first", env, num_rounds=10_000, **settings)
    clients = [
        _client(
            pki,
            tmp_path,
            f"site-{i}",
            address,
            partition_index=i,
            num_partitions=3,
            reconnect_max_delay_seconds=1,
            # Rounds take ~0.1 s, so the kill may land after the clients signed round 3's
            # survivors; a site that must ride out coordinator crashes at that point allows a
            # second attempt (docs/privacy.md: the trade-off with differencing).
            secagg_max_attempts_per_round=2,
        )
        for i in range(3)
    ]
    second = None
    try:
        deadline = time.monotonic() + 180
        while "round 3: secagg_share_keys" not in (tmp_path / "site-0.log").read_text():
            assert time.monotonic() < deadline and first.poll() is None, _log(tmp_path, "first")
            time.sleep(0.01)
        first.kill()  # SIGKILL in round 3's secure session
        first.wait()
        records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        total = len(records) + 2
        second = _server(pki, tmp_path, "second", env, num_rounds=total, **settings)
        assert second.wait(timeout=180) == 0, _log(tmp_path, "second")
        for i, client in enumerate(clients):
            assert client.wait(timeout=60) == 0, _log(tmp_path, f"site-{i}")
    finally:
        _kill_all([first, *([second] if second else []), *clients])
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == list(range(1, total + 1))
    assert all(r["clients_accepted"] == 3 for r in rows)
    assert "secure aggregation recovered the sum of 3 of 3 clients" in _log(tmp_path, "second")
    # Every client answered a second advertisement for the round that was cut off.
    for i in range(3):
        assert _log(tmp_path, f"site-{i}").count("round 3: secagg_advertise") >= 2
