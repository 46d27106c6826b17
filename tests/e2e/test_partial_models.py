"""Partial models over mTLS: only the exchanged tensors travel (a head on a frozen base, whose
hash every site must match at join), and FedBN's local batch norms never leave their site."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch

from fedlink.client.app import FatalClientError, FederationClient
from fedlink.client.config import ClientConfig
from fedlink.common.tasks import load_task
from fedlink.common.tasks.base import DataRequest
from fedlink.common.tensors import StateDict, encode_state, open_state_file
from fedlink.common.wire import payload_digest
from fedlink.v1 import federation_pb2 as pb

TASKS_DIR = Path(__file__).parent / "tasks"


@pytest.fixture(autouse=True)
def _test_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(TASKS_DIR))


def _client(
    pki: Any, tmp_path: Path, address: str, name: str, index: int, task: str
) -> FederationClient:
    cert, key, ca = pki.client(name)
    config = ClientConfig(
        server=address,
        cert=cert,
        key=key,
        ca=ca,
        task=task,
        num_partitions=2,
        partition_index=index,
        threads=1,
        device="cpu",
        spool_dir=tmp_path,
        state_dir=tmp_path / name,
    )
    return FederationClient(config)


def _run_all(clients: list[FederationClient]) -> list[int]:
    codes = [-1] * len(clients)

    def run(i: int) -> None:
        codes[i] = clients[i].run()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return codes


def _base(path: Path, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    safetensors.torch.save_file(
        {"weight": torch.randn(32, 64, generator=generator), "bias": torch.zeros(32)}, str(path)
    )
    return path


def test_a_partial_federation_exchanges_only_the_head_and_refuses_other_frozen_weights(
    pki: Any, start_coordinator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pretrained = _base(tmp_path / "pretrained.safetensors", seed=1)
    monkeypatch.setenv("FROZEN_BASE", str(pretrained))
    torch.manual_seed(0)
    initial = load_task("frozen_base_digits_task").build_model().state_dict()
    coordinator = start_coordinator(
        initial,
        task="frozen_base_digits_task",
        num_rounds=2,
        min_clients=2,
        min_fit_clients=2,
        exchanged_tensors=("head.*",),
    )
    # A site that loaded other pretrained weights is refused at join, before any round.
    monkeypatch.setenv("FROZEN_BASE", str(_base(tmp_path / "other.safetensors", seed=2)))
    stranger = _client(pki, tmp_path, coordinator.address, "stranger", 0, "frozen_base_digits_task")
    with pytest.raises(FatalClientError) as refused:
        stranger.run()
    message = str(refused.value)
    assert "frozen tensors (those the federation does not exchange) hash to SHA-256" in message
    assert coordinator.engine.frozen_sha256.hex() in message
    assert "load the same pretrained weights as the coordinator" in message

    monkeypatch.setenv("FROZEN_BASE", str(pretrained))
    sites = [
        _client(pki, tmp_path, coordinator.address, f"site-{i}", i, "frozen_base_digits_task")
        for i in range(2)
    ]
    assert _run_all(sites) == [0, 0]
    summary = coordinator.summary()
    assert summary.completed and summary.last_record is not None
    assert summary.last_record.clients_accepted == 2
    assert summary.last_record.federated_accuracy is not None
    with open_state_file(summary.final_model) as final:
        assert sorted(final) == ["head.bias", "head.weight"]
        assert not torch.equal(final["head.weight"], initial["head.weight"])
    # Only the head moved: 330 of 2,410 parameters, both ways.
    head_bytes = (32 * 10 + 10) * 4
    assert summary.last_record.bytes_up < 2 * (head_bytes + 1024)
    base = safetensors.torch.load_file(str(pretrained))
    for site in sites:
        state = site.model.state_dict()
        assert torch.equal(state["base.weight"], base["weight"])


def _bn_state() -> StateDict:
    torch.manual_seed(0)
    return load_task("batchnorm_digits_task").build_model().state_dict()


BN = ("1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")


def test_fedbn_batch_norms_stay_on_their_site_across_rounds(
    pki: Any, start_coordinator: Any, tmp_path: Path
) -> None:
    initial = _bn_state()
    rounds = 2
    coordinator = start_coordinator(
        initial,
        task="batchnorm_digits_task",
        num_rounds=rounds,
        min_clients=2,
        min_fit_clients=2,
        local_tensors=("1.*",),
    )
    sites = [
        _client(pki, tmp_path, coordinator.address, f"site-{i}", i, "batchnorm_digits_task")
        for i in range(2)
    ]
    assert _run_all(sites) == [0, 0]
    summary = coordinator.summary()
    assert summary.completed and summary.last_record is not None
    assert summary.last_record.federated_accuracy is not None
    with open_state_file(summary.final_model) as final:
        assert set(final) == set(initial) - set(BN)
    kept = []
    for index, site in enumerate(sites):
        stored = tmp_path / f"site-{index}" / f"local-tensors-site-{index}.safetensors"
        with open_state_file(stored) as local:
            assert sorted(local) == sorted(BN)
            kept.append({name: t.clone() for name, t in local.items()})
        # Known answer: the counter counts this site's own batches over every round, which it
        # could not if the coordinator had averaged or reset it.
        defaults = ClientConfig(insecure=True)  # the partition the site trained on
        data = load_task("batchnorm_digits_task").load_data(
            DataRequest(defaults.partition, index, 2, seed=defaults.seed)
        )
        batches = math.ceil(len(data.train) / 32)  # type: ignore[arg-type]
        assert int(kept[-1]["1.num_batches_tracked"]) == rounds * batches
        assert torch.equal(site.model.state_dict()["1.running_mean"], kept[-1]["1.running_mean"])
    assert not torch.equal(kept[0]["1.running_mean"], kept[1]["1.running_mean"])
    # A site that restarts takes its batch norms back from its state directory.
    restarted = _client(pki, tmp_path, coordinator.address, "site-0", 0, "batchnorm_digits_task")
    assert not torch.equal(
        restarted.model.state_dict()["1.running_mean"], kept[0]["1.running_mean"]
    )
    assert restarted.run() == 0  # told the run is finished, after joining
    for name in BN:
        assert torch.equal(restarted.model.state_dict()[name], kept[0][name]), name


def test_fedbn_batch_norms_are_never_on_the_wire(pki: Any, start_coordinator: Any) -> None:
    initial = _bn_state()
    coordinator = start_coordinator(
        initial,
        task="batchnorm_digits_task",
        num_rounds=1,
        min_clients=1,
        min_fit_clients=1,
        evaluate_every=0,
        local_tensors=("1.*",),
    )
    stub = coordinator.stub(pki, "probe")
    reply = stub.Join(pb.JoinRequest(), timeout=10)
    assert list(reply.local_tensors) == ["1.*"] and reply.frozen_sha256 == b""
    assert {entry.name for entry in reply.model_manifest} == set(initial) - set(BN)
    messages = list(stub.PullTask(pb.PullTaskRequest(), timeout=30))
    task = messages[0].header
    sent = safetensors.torch.load(b"".join(m.chunk.data for m in messages[1:]))
    assert set(sent) == set(initial) - set(BN)
    # An upload that carries a local tensor is refused, naming it.
    payload = encode_state({**sent, "1.running_mean": torch.zeros(32)})
    header = pb.ResultHeader(task_id=task.task_id, round=task.round, num_examples=1)
    header.payload.CopyFrom(
        pb.PayloadInfo(size=len(payload), blake3=payload_digest(payload), encoding="safetensors")
    )
    chunks = [pb.ResultMessage(chunk=pb.Chunk(offset=0, data=payload))]
    with pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(iter([pb.ResultMessage(header=header), *chunks]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown tensor(s): '1.running_mean'" in (refused.value.details() or "")
    coordinator.stop.set()


def test_fedbn_composes_with_secure_aggregation(
    pki: Any, start_coordinator: Any, tmp_path: Path
) -> None:
    initial = _bn_state()
    coordinator = start_coordinator(
        initial,
        task="batchnorm_digits_task",
        num_rounds=1,
        min_clients=3,
        min_fit_clients=3,
        evaluate_every=0,
        secure_aggregation=True,
        local_tensors=("1.*",),
    )
    sites = [
        _client(pki, tmp_path, coordinator.address, f"site-{i}", i % 2, "batchnorm_digits_task")
        for i in range(3)
    ]
    assert _run_all(sites) == [0, 0, 0]
    summary = coordinator.summary()
    assert summary.completed and summary.last_record is not None
    assert summary.last_record.clients_accepted == 3
    with open_state_file(summary.final_model) as final:
        assert set(final) == set(initial) - set(BN)
        assert not torch.equal(final["0.weight"], initial["0.weight"])
