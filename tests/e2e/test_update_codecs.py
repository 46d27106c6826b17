"""Update codecs over mTLS: a coordinator refuses an update in a codec it did not allow and
decodes one it did; whole federations of client processes send int8 updates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import torch
from conftest import wait_for_file
from test_federation_run import _client, _kill_all, _log, _server

from fedlink.common.codecs import UpdateCodec, compress_update, decompress_update
from fedlink.common.tensors import StateDict, encode_state, manifest_of, open_state_file
from fedlink.common.wire import payload_digest
from fedlink.v1 import federation_pb2 as pb


def _push(
    stub: Any, task: pb.TaskHeader, payload: bytes, encoding: str
) -> tuple[grpc.StatusCode, str]:
    header = pb.ResultHeader(task_id=task.task_id, round=task.round, num_examples=1)
    header.payload.CopyFrom(
        pb.PayloadInfo(size=len(payload), blake3=payload_digest(payload), encoding=encoding)
    )
    messages = [pb.ResultMessage(header=header)]
    messages += [
        pb.ResultMessage(chunk=pb.Chunk(offset=o, data=payload[o : o + 4096]))
        for o in range(0, len(payload), 4096)
    ]
    try:
        stub.PushResult(iter(messages), timeout=30)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def _trained(state: StateDict) -> StateDict:
    generator = torch.Generator().manual_seed(3)
    return {
        name: t + 0.1 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
        for name, t in state.items()
    }


def test_only_the_codec_the_coordinator_allows_is_accepted_and_it_is_decoded(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    int8 = UpdateCodec("int8", block_size=4)
    names = ["plain", "fp16", "int8"]
    coordinator = start_coordinator(
        small_state,
        num_rounds=1,
        min_clients=3,
        min_fit_clients=3,
        evaluate_every=0,
        update_codec="int8",
        update_int8_block_size=4,
    )
    stubs = {name: coordinator.stub(pki, name) for name in names}
    for stub in stubs.values():
        stub.Join(pb.JoinRequest(), timeout=10)
    tasks = {}
    for name, stub in stubs.items():
        header = next(iter(stub.PullTask(pb.PullTaskRequest(), timeout=30))).header
        # The client learns the codec from the task header.
        assert (header.update_codec.name, header.update_codec.block_size) == ("int8", 4)
        tasks[name] = (stub, header)
    trained = _trained(small_state)
    code, details = _push(*tasks["plain"], encode_state(trained), "safetensors")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'safetensors' is not allowed in this federation" in details
    assert "'fedlink-delta/int8'" in details
    fp16, _ = compress_update(UpdateCodec("fp16"), trained, small_state, {})
    code, details = _push(*tasks["fp16"], encode_state(fp16), "fedlink-delta/fp16")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not allowed" in details
    payload, _ = compress_update(int8, trained, small_state, {})
    assert _push(*tasks["int8"], encode_state(payload), int8.encoding)[0] == grpc.StatusCode.OK

    summary = coordinator.summary()
    assert summary.completed and summary.last_record is not None
    assert summary.last_record.clients_accepted == 1
    assert set(summary.last_record.rejected) == {"plain", "fp16"}
    # One update of weight 1: the new global model is exactly what the int8 payload decodes to.
    expected = decompress_update(int8, payload, small_state, manifest_of(small_state))
    with open_state_file(summary.final_model) as final:
        for name, tensor in expected.items():
            assert torch.equal(final[name], tensor), name


def test_a_coordinator_without_a_codec_refuses_a_compressed_update(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = start_coordinator(
        small_state, num_rounds=1, min_clients=1, min_fit_clients=1, evaluate_every=0
    )
    stub = coordinator.stub(pki, "eager")
    stub.Join(pb.JoinRequest(), timeout=10)
    task = next(iter(stub.PullTask(pb.PullTaskRequest(), timeout=30))).header
    assert task.update_codec.name == "fp32" and task.update_codec.topk == 0
    payload, _ = compress_update(UpdateCodec("int8"), _trained(small_state), small_state, {})
    code, details = _push(stub, task, encode_state(payload), "fedlink-delta/int8")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'fedlink-delta/int8' is not allowed in this federation: it takes 'safetensors'" in (
        details
    )
    coordinator.stop.set()


def test_a_federation_of_client_processes_sends_int8_top_k_updates(
    pki: Any, tmp_path: Path
) -> None:
    address_file = tmp_path / "address"
    server = _server(
        pki,
        tmp_path,
        "run",
        listen="127.0.0.1:0",
        address_file=address_file,
        num_rounds=3,
        min_clients=2,
        min_fit_clients=2,
        learning_rate=0.05,
        update_codec="int8",
        update_topk=0.2,
    )
    processes = [server]
    try:
        address = wait_for_file(address_file, server)
        for i in range(2):
            processes.append(
                _client(
                    pki,
                    tmp_path,
                    f"site-{i}",
                    address,
                    partition="iid",
                    partition_index=i,
                    num_partitions=2,
                    state_dir=tmp_path / f"site-{i}-state",
                )
            )
        assert server.wait(timeout=300) == 0, _log(tmp_path, "run")
        for process in processes[1:]:
            assert process.wait(timeout=60) == 0
    finally:
        _kill_all(processes)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all(r["clients_accepted"] == 2 for r in records)
    assert records[-1]["test_accuracy"] > records[0]["test_accuracy"]
    model_bytes = (tmp_path / "run" / "final_model.safetensors").stat().st_size
    for record in records:
        # Two clients' uploads, each 20% of the entries at a byte each plus an int32 position.
        assert record["bytes_up"] <= 2 * model_bytes * 0.3
    assert "MB, int8, block 1024, top-0.2 with error feedback)" in _log(tmp_path, "site-0")
    # Error feedback persists as safetensors, one entry per floating tensor.
    residual = tmp_path / "site-0-state" / "update-residual-site-0.safetensors"
    with open_state_file(residual) as kept:
        assert sorted(kept) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
        assert all(bool(torch.isfinite(t).all()) for t in kept.values())
        assert float(kept["fc1.weight"].abs().sum()) > 0


def _pushed_round(
    pki: Any, coordinator: Any, small_state: StateDict, codec: UpdateCodec, names: list[str]
) -> list[StateDict]:
    """Every client pushes a different int8 update; what each decodes to."""
    stubs = {name: coordinator.stub(pki, name) for name in names}
    for stub in stubs.values():
        stub.Join(pb.JoinRequest(), timeout=10)
    decoded = []
    for index, stub in enumerate(stubs.values()):
        task = next(iter(stub.PullTask(pb.PullTaskRequest(), timeout=30))).header
        trained = {
            key: t + 0.1 * (index + 1) if t.is_floating_point() else t
            for key, t in small_state.items()
        }
        payload, _ = compress_update(codec, trained, small_state, {})
        assert _push(stub, task, encode_state(payload), codec.encoding)[0] == grpc.StatusCode.OK
        decoded.append(decompress_update(codec, payload, small_state, manifest_of(small_state)))
    return decoded


def test_robust_rules_and_dp_aggregate_the_decoded_updates(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    codec = UpdateCodec("int8", block_size=4)
    names = ["a", "b", "c"]
    settings = {
        "num_rounds": 1,
        "min_clients": 3,
        "min_fit_clients": 3,
        "min_results": 3,
        "evaluate_every": 0,
        "update_codec": "int8",
        "update_int8_block_size": 4,
    }
    median = start_coordinator(small_state, aggregation="median", **settings)
    decoded = _pushed_round(pki, median, small_state, codec, names)
    with open_state_file(median.summary().final_model) as final:
        for key, tensor in final.items():
            if tensor.is_floating_point():
                expected = torch.stack([d[key] for d in decoded]).median(dim=0).values
                assert torch.allclose(tensor, expected), key
    private = start_coordinator(small_state, dp_clip_norm=0.05, **settings)
    _pushed_round(pki, private, small_state, codec, names)
    summary = private.summary()
    assert summary.completed and summary.last_record is not None
    assert summary.last_record.epsilon is not None and summary.last_record.clients_accepted == 3
