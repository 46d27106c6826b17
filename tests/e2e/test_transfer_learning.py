"""Federated transfer learning with real processes over mTLS: the digits-transfer task's new head
trained on a backbone each site loads from its own file; only the head travels, and a site whose
backbone differs is refused at join."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from test_federation_run import _client, _free_port, _kill_all, _log, _server

from fedlink.common.partial import frozen_digest
from fedlink.common.tasks import digits_transfer
from fedlink.common.tensors import open_state_file, save_state_file

TASK = "digits-transfer"


def _backbone(path: Path, seed: int) -> Path:
    """A deterministic stand-in for the pretrained backbone (pretraining takes minutes)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = digits_transfer.Backbone().state_dict()
    save_state_file(
        {name: 0.1 * torch.randn(t.shape, generator=generator) for name, t in shapes.items()}, path
    )
    return path


def test_only_the_head_travels_and_a_site_with_another_backbone_is_refused_at_join(
    pki: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrained = _backbone(tmp_path / "backbone.safetensors", seed=1)
    other = _backbone(tmp_path / "other.safetensors", seed=2)
    monkeypatch.setenv(digits_transfer.BACKBONE_ENV, str(pretrained))
    torch.manual_seed(0)  # the coordinator's default seed draws the same initial head
    initial = digits_transfer.build_model().state_dict()
    pinned = frozen_digest(digits_transfer.HEAD_ONLY.frozen(initial)).hex()
    address = f"127.0.0.1:{_free_port()}"
    server = _server(
        pki,
        tmp_path,
        "run",
        listen=address,
        task=TASK,
        num_rounds=2,
        min_clients=2,
        min_fit_clients=2,
        learning_rate=0.05,
        exchanged_tensors="head.*",
        frozen_sha256=pinned,
    )
    # A site that loaded another backbone (started with the coordinator: it retries until the
    # coordinator listens) is refused at join, before the others start.
    stranger = _client(
        pki, tmp_path, "stranger", address, {digits_transfer.BACKBONE_ENV: str(other)}, task=TASK
    )
    processes = [server, stranger]
    try:
        assert stranger.wait(timeout=120) == 2
        refusal = _log(tmp_path, "stranger")
        assert f"hash to SHA-256 {frozen_digest(_renamed(other)).hex()}" in refusal
        assert f"but the coordinator's to {pinned}" in refusal
        for i in range(2):
            processes.append(
                _client(
                    pki,
                    tmp_path,
                    f"site-{i}",
                    address,
                    task=TASK,
                    partition="iid",
                    partition_index=i,
                    num_partitions=2,
                )
            )
        assert server.wait(timeout=300) == 0, _log(tmp_path, "run")
        for process in processes[2:]:
            assert process.wait(timeout=60) == 0
    finally:
        _kill_all(processes)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["clients_accepted"] for r in records] == [2, 2]
    head_bytes = (digits_transfer.FEATURES + 1) * digits_transfer.NUM_CLASSES * 4
    for record in records:  # the head and a safetensors header, from each of the two clients
        assert 2 * head_bytes < record["bytes_up"] < 2 * (head_bytes + 512)
        # ... and to each of them twice: to train, then to evaluate
        assert 4 * head_bytes < record["bytes_down"] < 4 * (head_bytes + 512)
    with open_state_file(tmp_path / "run" / "final_model.safetensors") as final:
        assert sorted(final) == ["head.bias", "head.weight"]
        assert not torch.equal(final["head.weight"], initial["head.weight"])
    assert f"frozen tensors: SHA-256 {pinned}" in _log(tmp_path, "run")


def _renamed(path: Path) -> dict[str, torch.Tensor]:
    """A backbone file's tensors as the model names them."""
    with open_state_file(path) as stored:
        return {f"backbone.{name}": tensor.clone() for name, tensor in stored.items()}
