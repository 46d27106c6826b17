"""Hostile or broken updates against a live coordinator over mTLS: each is refused with a precise
gRPC status, and the aggregate ends up exactly the one honest update, as if they never came."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch

from fedlink.common.tensors import StateDict, encode_state, open_state_file
from fedlink.common.wire import payload_digest
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

CHUNK = 64 << 10

Messages = Iterator[pb.ResultMessage]


def _header(task: pb.TaskHeader, payload: bytes | None, **fields: Any) -> pb.ResultMessage:
    header = pb.ResultHeader(task_id=task.task_id, round=task.round, num_examples=1)
    if payload is not None:
        header.payload.CopyFrom(
            pb.PayloadInfo(
                size=len(payload), blake3=payload_digest(payload), encoding="safetensors"
            )
        )
    for name, value in fields.items():
        setattr(header, name, value)
    return pb.ResultMessage(header=header)


def _chunks(payload: bytes, size: int = CHUNK) -> list[pb.ResultMessage]:
    return [
        pb.ResultMessage(chunk=pb.Chunk(offset=o, data=payload[o : o + size]))
        for o in range(0, len(payload), size)
    ]


def _upload(task: pb.TaskHeader, state: StateDict, **fields: Any) -> list[pb.ResultMessage]:
    payload = encode_state(state)
    return [_header(task, payload, **fields), *_chunks(payload)]


def _trailed(task: pb.TaskHeader, payload: bytes, digest: bytes) -> list[pb.ResultMessage]:
    """An upload as fedlink's client sends it: no digest in the header, a trailer after."""
    header = _header(task, payload)
    header.header.payload.ClearField("blake3")
    trailer = pb.ResultMessage(trailer=pb.PayloadTrailer(blake3=digest))
    return [header, *_chunks(payload), trailer]


def _push(stub: pb_grpc.FederationStub, messages: list[pb.ResultMessage]) -> grpc.StatusCode:
    try:
        stub.PushResult(iter(messages), timeout=30)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def _honest(initial: StateDict) -> StateDict:
    return {name: (t + 1.5 if t.dtype.is_floating_point else t + 7) for name, t in initial.items()}


def _with(state: StateDict, name: str, value: torch.Tensor | None) -> StateDict:
    changed = dict(state)
    if value is None:
        del changed[name]
    else:
        changed[name] = value
    return changed


def _cases(
    initial: StateDict,
) -> dict[str, tuple[Callable[[pb.TaskHeader], list[pb.ResultMessage]], grpc.StatusCode]]:
    honest = _honest(initial)
    weight = honest["layer.weight"]
    nan = weight.clone()
    nan[0, 0] = float("nan")
    inf = weight.clone()
    inf[1, 1] = float("inf")
    good_payload = encode_state(honest)
    digest = payload_digest(good_payload)
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    def reordered(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        chunks = _chunks(good_payload, 64)
        return [_header(task, good_payload), chunks[1], chunks[0], *chunks[2:]]

    def truncated(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        return [_header(task, good_payload), *_chunks(good_payload, 64)[:-1]]

    def wrong_hash(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        tampered = bytearray(good_payload)
        tampered[-1] ^= 0xFF
        header = _header(task, good_payload)
        header.header.payload.blake3 = digest
        return [header, *_chunks(bytes(tampered))]

    def not_safetensors(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        junk = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(200)
        return [_header(task, junk), *_chunks(junk)]

    def oversized(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        header = _header(task, good_payload)
        header.header.payload.size = 1 << 40
        return [header]

    def chunk_first(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        return _chunks(good_payload)

    def trailer_mismatch(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        return _trailed(task, good_payload, payload_digest(good_payload + b"!"))

    def trailer_missing(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        return _trailed(task, good_payload, digest)[:-1]

    def digest_twice(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        trailer = pb.ResultMessage(trailer=pb.PayloadTrailer(blake3=digest))
        return [_header(task, good_payload), *_chunks(good_payload), trailer]

    def chunk_after_trailer(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        messages = _trailed(task, good_payload, digest)
        return [*messages[:-2], messages[-1], messages[-2]]

    def other_round(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        return _upload(task, honest, round=task.round + 1)

    def other_task(task: pb.TaskHeader) -> list[pb.ResultMessage]:
        return _upload(task, honest, task_id="0" * 32)

    return {
        "wrong-shape": (
            lambda t: _upload(t, _with(honest, "layer.weight", torch.zeros(4, 4))),
            invalid,
        ),
        "wrong-dtype": (
            lambda t: _upload(t, _with(honest, "layer.weight", weight.double())),
            invalid,
        ),
        "nan": (lambda t: _upload(t, _with(honest, "layer.weight", nan)), invalid),
        "inf": (lambda t: _upload(t, _with(honest, "layer.weight", inf)), invalid),
        "missing-tensor": (lambda t: _upload(t, _with(honest, "layer.bias", None)), invalid),
        "unknown-tensor": (
            lambda t: _upload(t, _with(honest, "backdoor.weight", torch.ones(2))),
            invalid,
        ),
        "zero-examples": (lambda t: _upload(t, honest, num_examples=0), invalid),
        "huge-examples": (lambda t: _upload(t, honest, num_examples=10**12), invalid),
        "stale-round": (other_round, grpc.StatusCode.FAILED_PRECONDITION),
        "unknown-task": (other_task, grpc.StatusCode.FAILED_PRECONDITION),
        "reordered-chunks": (reordered, invalid),
        "truncated-chunks": (truncated, grpc.StatusCode.DATA_LOSS),
        "hash-mismatch": (wrong_hash, grpc.StatusCode.DATA_LOSS),
        "not-safetensors": (not_safetensors, invalid),
        "oversized-payload": (oversized, grpc.StatusCode.RESOURCE_EXHAUSTED),
        "no-header": (chunk_first, invalid),
        "trailer-mismatch": (trailer_mismatch, grpc.StatusCode.DATA_LOSS),
        "trailer-missing": (trailer_missing, grpc.StatusCode.DATA_LOSS),
        "digest-twice": (digest_twice, invalid),
        "chunk-after-trailer": (chunk_after_trailer, invalid),
    }


def test_every_bad_update_is_refused_and_only_the_honest_one_is_aggregated(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    initial = small_state
    cases = _cases(initial)
    names = ["honest", *cases]
    coordinator = start_coordinator(
        initial,
        num_rounds=1,
        min_clients=len(names),
        min_fit_clients=len(names),
        min_results=1,
        evaluate_every=0,
        max_num_examples=1000,
        round_timeout_seconds=60,
    )
    stubs = {name: coordinator.stub(pki, name) for name in names}
    for name, stub in stubs.items():
        assert stub.Join(pb.JoinRequest(), timeout=10).identity == name
    tasks: dict[str, pb.TaskHeader] = {}
    for name, stub in stubs.items():
        messages = list(stub.PullTask(pb.PullTaskRequest(), timeout=30))
        assert messages[0].header.kind == pb.TASK_KIND_TRAIN
        tasks[name] = messages[0].header
        global_bytes = b"".join(m.chunk.data for m in messages[1:])
        assert payload_digest(global_bytes) == messages[0].header.payload.blake3
        assert safetensors.torch.load(global_bytes).keys() == initial.keys()

    honest = _honest(initial)
    assert _push(stubs["honest"], _upload(tasks["honest"], honest)) == grpc.StatusCode.OK
    # One submission per client per round.
    assert (
        _push(stubs["honest"], _upload(tasks["honest"], honest)) == grpc.StatusCode.ALREADY_EXISTS
    )
    outcomes = {name: _push(stubs[name], build(tasks[name])) for name, (build, _) in cases.items()}
    assert outcomes == {name: expected for name, (_, expected) in cases.items()}
    # A result for another task or round is refused without using up the client's submission
    # (it may be a late reply to an earlier round); these two now send garbage and are dropped.
    for name in ("stale-round", "unknown-task"):
        bad_count = _upload(tasks[name], honest, num_examples=0)
        assert _push(stubs[name], bad_count) == grpc.StatusCode.INVALID_ARGUMENT
    # A refused client cannot sneak a second try into the same round.
    retry = _upload(tasks["nan"], honest)
    assert _push(stubs["nan"], retry) in (
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    # A stream that ends before its payload is complete is what a dropped connection can look
    # like: not a rejection, and the client may send its result again.
    # So is one whose trailer never came. Both send it again, the digest in a trailer.
    incomplete = {"truncated-chunks", "trailer-missing"}
    honest_payload = encode_state(honest)
    for name in incomplete:
        retry = _trailed(tasks[name], honest_payload, payload_digest(honest_payload))
        assert _push(stubs[name], retry) == grpc.StatusCode.OK

    summary = coordinator.summary()
    assert summary.completed
    record = summary.last_record
    assert record is not None and record.clients_accepted == 1 + len(incomplete)
    assert set(record.rejected) == set(cases) - incomplete
    # Weight 1 each and the same honest update three times: the new global model is it (to
    # float32 rounding of a mean of thirds; integers exactly).
    with open_state_file(summary.final_model) as final:
        for name, tensor in honest.items():
            torch.testing.assert_close(final[name], tensor, msg=name)


def test_rejection_messages_say_what_is_wrong(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = start_coordinator(
        small_state, num_rounds=1, min_clients=1, min_fit_clients=1, evaluate_every=0
    )
    stub = coordinator.stub(pki, "explainer")
    stub.Join(pb.JoinRequest(), timeout=10)
    task = next(iter(stub.PullTask(pb.PullTaskRequest(), timeout=30))).header
    bad = _with(_honest(small_state), "layer.weight", torch.zeros(2, 2))
    with pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(iter(_upload(task, bad)), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "layer.weight" in (refused.value.details() or "")
    assert "shape" in (refused.value.details() or "")
    # Below quorum the round does not count; the model the coordinator holds is unchanged.
    coordinator.stop.set()
    summary = coordinator.summary()
    assert summary.rounds_completed == 0
    with open_state_file(summary.final_model) as final:
        for name, tensor in small_state.items():
            assert torch.equal(final[name], tensor)


def test_negative_sample_counts_cannot_even_be_encoded() -> None:
    # num_examples is uint64 on the wire: a negative weight is unrepresentable, not just refused.
    with pytest.raises(ValueError):
        pb.ResultHeader(num_examples=-1)


def _join_and_pull(
    coordinator: Any, pki: Any, names: list[str]
) -> dict[str, tuple[pb_grpc.FederationStub, pb.TaskHeader]]:
    stubs = {name: coordinator.stub(pki, name) for name in names}
    for stub in stubs.values():
        stub.Join(pb.JoinRequest(), timeout=10)
    tasks = {}
    for name, stub in stubs.items():
        messages = list(stub.PullTask(pb.PullTaskRequest(), timeout=30))  # header and the model
        tasks[name] = (stub, messages[0].header)
    return tasks


@pytest.mark.parametrize(
    ("ratio", "reason"),
    [(100.0, "more than max_update_norm_ratio"), (0.0, "would make the aggregate non-finite")],
)
def test_a_finite_extreme_update_is_refused_and_the_aggregate_stays_finite(
    pki: Any, start_coordinator: Any, small_state: StateDict, ratio: float, reason: str
) -> None:
    # Every float near the float32 maximum, 2 examples: finite, so it passes the NaN/Inf check;
    # folded in, the weighted sum would overflow and the next global model would be all Inf.
    coordinator = start_coordinator(
        small_state,
        num_rounds=1,
        min_clients=2,
        min_fit_clients=2,
        min_results=1,
        evaluate_every=0,
        max_update_norm_ratio=ratio,
    )
    tasks = _join_and_pull(coordinator, pki, ["honest", "poisoner"])
    extreme = {
        name: torch.full_like(t, 3.0e38) if t.dtype.is_floating_point else t
        for name, t in small_state.items()
    }
    stub, task = tasks["poisoner"]
    with pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(iter(_upload(task, extreme, num_examples=2)), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (refused.value.details() or "")
    honest = _honest(small_state)
    stub, task = tasks["honest"]
    assert _push(stub, _upload(task, honest)) == grpc.StatusCode.OK

    summary = coordinator.summary()
    assert summary.completed
    assert summary.last_record is not None
    assert set(summary.last_record.rejected) == {"poisoner"}
    with open_state_file(summary.final_model) as final:
        for name, tensor in honest.items():
            assert torch.equal(final[name], tensor), name


def test_one_client_cannot_push_an_integer_buffer_to_the_int64_maximum(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = start_coordinator(
        small_state, num_rounds=1, min_clients=2, min_fit_clients=2, evaluate_every=0
    )
    tasks = _join_and_pull(coordinator, pki, ["honest", "counter-forger"])
    honest = _honest(small_state)  # counts 7 batches more than the global model
    forged = _with(honest, "norm.num_batches_tracked", torch.tensor(2**63 - 1))
    for name, state in (("honest", honest), ("counter-forger", forged)):
        stub, task = tasks[name]
        assert _push(stub, _upload(task, state, num_examples=1000 if name != "honest" else 1)) == (
            grpc.StatusCode.OK
        )
    summary = coordinator.summary()
    with open_state_file(summary.final_model) as final:
        # The median of the global value (0), the honest one (7) and the forged one.
        assert int(final["norm.num_batches_tracked"]) == 7
        assert torch.allclose(final["layer.weight"], honest["layer.weight"])
