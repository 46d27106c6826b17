"""Hostile inputs for a live coordinator, shared by `tests/e2e/test_fuzz.py` (about 1,250 cases
in CI) and `benchmarks/fuzz.py` (as many as asked for, against a `fedlink server` process).

`FuzzClient` is one participant of a coordinator that runs a single one-client round over and
over (every attempt fails, so it is repeated with a new task id). For each case it pulls the
current TRAIN task, sends a hostile upload over a raw channel (bytes in, bytes out, so nothing
on our side insists the messages parse), and records the status. Every strategy here builds
inputs that are invalid by construction: the coordinator must refuse each one with a precise
status, never crash or hang, and never change the global model, which the client checks on
every pull by its digest.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import safetensors.torch
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import assume
from hypothesis import strategies as st

from fedlink.common.tensors import encode_state
from fedlink.common.wire import SESSION_METADATA_KEY, payload_digest
from fedlink.server.aggregation import SUM_LIMIT
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

SERVICE = "/fedlink.v1.Federation/"
# What a refused upload may get: "refused, and the coordinator knew why". OK, UNKNOWN (an
# unexpected exception in a handler) and INTERNAL (gRPC failing to parse a message itself, which
# also leaks the call's memory; the coordinator parses in its handlers instead) never are.
REFUSED_UPLOAD = (
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL")


class ServerFailure(AssertionError):
    """The coordinator accepted a hostile input, hung, crashed, or changed the model."""


@dataclass
class FuzzClient:
    """One participant that sends hostile uploads for its current task over a raw channel."""

    channel: grpc.Channel
    outsider: grpc.Channel  # a CA-signed client the coordinator's allow-list refuses
    address: str  # host:port, for connections that never start a TLS handshake
    timeout: float = 30.0
    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    history: list[pb.TaskHeader] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stub = pb_grpc.FederationStub(self.channel)
        self._push = self.channel.stream_unary(SERVICE + "PushResult")
        self._task: pb.TaskHeader | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()
        self.global_sha: bytes = b""
        self.global_payload: bytes = b""

    def join(self) -> None:
        _, call = self._stub.Join.with_call(pb.JoinRequest(), timeout=self.timeout)
        token = dict(call.trailing_metadata() or ()).get(SESSION_METADATA_KEY)
        self._metadata = ((SESSION_METADATA_KEY, str(token)),) if token else ()

    @property
    def cases(self) -> int:
        return sum(self.outcomes.values())

    def task(self) -> pb.TaskHeader:
        """The current TRAIN task, pulled when needed; the global model must be unchanged."""
        while self._task is None:
            messages = list(
                self._stub.PullTask(
                    pb.PullTaskRequest(), metadata=self._metadata, timeout=self.timeout
                )
            )
            header = messages[0].header
            if header.kind == pb.TASK_KIND_WAIT:
                continue
            if header.kind != pb.TASK_KIND_TRAIN:
                raise ServerFailure(f"expected a TRAIN task, got kind {header.kind}")
            if not self.global_sha:
                self.global_payload = b"".join(m.chunk.data for m in messages[1:])
                self.global_sha = payload_digest(self.global_payload)
            if header.payload.blake3 != self.global_sha:
                raise ServerFailure(f"the global model changed (round {header.round})")
            self._task = header
            self.history.append(header)
        return self._task

    def honest_state(self) -> dict[str, torch.Tensor]:
        """An update the coordinator would accept: the global model, every float plus one."""
        state = safetensors.torch.load(self.global_payload)
        return {k: v + 1 if v.dtype.is_floating_point else v for k, v in state.items()}

    def send(
        self,
        family: str,
        messages: Iterable[bytes],
        allowed: Iterable[grpc.StatusCode],
    ) -> grpc.StatusCode:
        """Push raw messages for the current task; the status must be one of `allowed`."""
        allowed = frozenset(allowed)
        messages = list(messages)
        if grpc.StatusCode.OK not in allowed:
            assume(not would_accept(messages, self.task(), self.global_payload))
        code = self._raw_push(messages)
        self.outcomes[(family, code.name)] += 1
        if code not in allowed:
            raise ServerFailure(
                f"{family}: coordinator answered {code.name}; expected one of "
                f"{sorted(c.name for c in allowed)}"
            )
        return code

    def settle(self) -> grpc.StatusCode:
        """End this client's part in the current round with a certainly refused result (a zero
        sample count), whether or not the last case used up its submission; the next case then
        pulls a fresh task."""
        task = self.task()
        header = pb.ResultHeader(task_id=task.task_id, round=task.round, num_examples=0)
        code = self._raw_push([pb.ResultMessage(header=header).SerializeToString()])
        self._task = None
        if code not in (
            grpc.StatusCode.INVALID_ARGUMENT,  # this consumed the submission
            grpc.StatusCode.ALREADY_EXISTS,  # the case did, and the round is still closing
            grpc.StatusCode.FAILED_PRECONDITION,  # the case did, and the round has closed
        ):
            raise ServerFailure(f"settling the round: unexpected {code.name}")
        return code

    def _raw_push(self, messages: list[bytes]) -> grpc.StatusCode:
        try:
            self._push(iter(messages), metadata=self._metadata, timeout=self.timeout)
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ServerFailure(
                    f"no answer within {self.timeout}s: the coordinator hangs"
                ) from None
            if code == grpc.StatusCode.UNAVAILABLE:
                raise ServerFailure(f"coordinator unavailable: {error.details()}") from None
            return code
        return grpc.StatusCode.OK


def would_accept(messages: list[bytes], task: pb.TaskHeader, global_payload: bytes) -> bool:
    """Whether `messages` happen to form a valid upload after all (a flipped byte may turn a
    sample count of 1 into 5): such a case is not hostile and is discarded, not sent."""
    try:
        parsed = [pb.ResultMessage.FromString(m) for m in messages]
    except Exception:  # protobuf's DecodeError: not parseable, certainly not valid
        return False
    if not parsed or parsed[0].WhichOneof("message") != "header":
        return False
    header = parsed[0].header
    if (header.task_id, header.round) != (task.task_id, task.round):
        return False
    if not header.HasField("payload") or not 0 < header.num_examples <= 10**6:
        return False
    digest = header.payload.blake3
    body = parsed[1:]
    if not digest and body and body[-1].WhichOneof("message") == "trailer":
        digest, body = body[-1].trailer.blake3, body[:-1]
    if any(m.WhichOneof("message") != "chunk" for m in body):
        return False
    offset, data = 0, bytearray()
    for message in body:
        if message.chunk.offset != offset or not message.chunk.data:
            return False
        data += message.chunk.data
        offset += len(message.chunk.data)
    info = header.payload
    if info.encoding != "safetensors" or info.size != len(data):
        return False
    if digest != payload_digest(data):
        return False
    try:
        update = safetensors.torch.load(bytes(data))
    except Exception:  # not a safetensors document
        return False
    reference = safetensors.torch.load(global_payload)
    if update.keys() != reference.keys():
        return False
    if not all(
        u.dtype == r.dtype
        and u.shape == r.shape
        and (not u.dtype.is_floating_point or bool(torch.isfinite(u).all()))
        for u, r in ((update[k], reference[k]) for k in reference)
    ):
        return False
    return within_bounds(update, reference, float(header.num_examples))


# The coordinator's default max_update_norm_ratio, which the fuzz targets keep.
UPDATE_NORM_RATIO = 100.0


def within_bounds(
    update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], weight: float
) -> bool:
    """Whether a well-formed update passes the coordinator's bounds: within UPDATE_NORM_RATIO of
    the global model, and unable to overflow a FedAvg sum (weight x largest value)."""
    floats = [name for name, t in reference.items() if t.dtype.is_floating_point]
    distance = math.sqrt(
        sum(float((update[n].double() - reference[n].double()).pow(2).sum()) for n in floats)
    )
    norm = math.sqrt(sum(float(reference[n].double().pow(2).sum()) for n in floats))
    largest = max((float(update[n].abs().max()) for n in floats if update[n].numel()), default=0.0)
    return distance <= UPDATE_NORM_RATIO * max(norm, 1.0) and weight * largest <= SUM_LIMIT


# --- building blocks ---------------------------------------------------------------------------


def result_header(
    task: pb.TaskHeader, payload: bytes | None, num_examples: int = 1
) -> pb.ResultMessage:
    header = pb.ResultHeader(task_id=task.task_id, round=task.round, num_examples=num_examples)
    if payload is not None:
        header.payload.CopyFrom(
            pb.PayloadInfo(
                size=len(payload), blake3=payload_digest(payload), encoding="safetensors"
            )
        )
    return pb.ResultMessage(header=header)


def chunk(offset: int, data: bytes) -> pb.ResultMessage:
    return pb.ResultMessage(chunk=pb.Chunk(offset=offset, data=data))


def chunked(payload: bytes, size: int = 64 << 10) -> list[pb.ResultMessage]:
    return [chunk(o, payload[o : o + size]) for o in range(0, len(payload), size)]


def upload(task: pb.TaskHeader, payload: bytes) -> list[bytes]:
    """A well-formed upload of `payload` for `task`, as raw messages."""
    return _raw([result_header(task, payload), *chunked(payload)])


def _raw(messages: Iterable[pb.ResultMessage]) -> list[bytes]:
    return [m.SerializeToString() for m in messages]


# --- malformed protobuf bytes -------------------------------------------------------------------


@st.composite
def malformed_streams(draw: st.DrawFn, task: pb.TaskHeader, payload: bytes) -> list[bytes]:
    """Random bytes where messages belong, or a real upload with bytes flipped, cut or inserted."""
    kind = draw(st.sampled_from(["random", "after-header", "mutated"]))
    if kind == "random":
        return draw(st.lists(st.binary(min_size=1, max_size=512), min_size=1, max_size=5))
    messages = upload(task, payload)
    if kind == "after-header":
        junk = draw(st.lists(st.binary(max_size=512), min_size=1, max_size=4))
        return [messages[0], *junk]
    # Indices are drawn from fixed ranges and reduced modulo the real lengths, which change with
    # the round number's varint: hypothesis must see the same choices in every round.
    index = draw(st.integers(0, 1 << 8)) % len(messages)
    target = bytearray(messages[index])
    operation = draw(st.sampled_from(["flip", "truncate", "insert", "varint"]))
    position = draw(st.integers(0, 1 << 24))
    if operation == "flip":
        target[position % len(target)] ^= draw(st.integers(1, 255))
    elif operation == "truncate":
        del target[position % len(target) :]
    elif operation == "insert":
        position %= len(target) + 1
        target[position:position] = draw(st.binary(min_size=1, max_size=16))
    else:  # an overlong or runaway varint where a tag or length belongs
        target[0:0] = b"\xff" * draw(st.integers(1, 11))
    messages[index] = bytes(target)
    return messages


def unparseable(message_type: Any) -> Callable[[bytes], bool]:
    """True for bytes that `message_type` cannot parse."""

    def check(data: bytes) -> bool:
        try:
            message_type.FromString(data)
        except Exception:  # protobuf's DecodeError, or worse: either way it does not parse
            return True
        return False

    return check


# --- chunk sequences -----------------------------------------------------------------------------

CHUNK_MUTATIONS = (
    "swap",
    "duplicate",
    "drop",
    "shift-offset",
    "empty-chunk",
    "size-lie",
    "hash-lie",
    "hash-length",
    "encoding",
    "no-header",
    "header-twice",
    "header-only",
    "no-payload",
    "bad-count",
    "bad-metric",
    "trailer-lie",
    "trailer-length",
    "trailer-missing",
    "trailer-twice",
    "trailer-early",
    "trailer-and-header",
)


@st.composite
def chunk_sequences(draw: st.DrawFn, task: pb.TaskHeader, payload: bytes) -> list[bytes]:
    """The honest payload split at random places, then broken in at least one way."""
    cuts = draw(st.lists(st.integers(1, len(payload) - 1), max_size=8, unique=True))
    edges = [0, *sorted(cuts), len(payload)]
    chunks = [chunk(a, payload[a:b]) for a, b in itertools.pairwise(edges)]
    header = result_header(task, payload)
    mutation = draw(st.sampled_from(CHUNK_MUTATIONS))
    if mutation == "swap":
        if len(chunks) < 2:
            chunks = [chunk(0, payload[:1]), chunk(1, payload[1:])]
        i, j = draw(st.lists(st.integers(0, len(chunks) - 1), min_size=2, max_size=2, unique=True))
        chunks[i], chunks[j] = chunks[j], chunks[i]
    elif mutation == "duplicate":
        i = draw(st.integers(0, len(chunks) - 1))
        chunks.insert(draw(st.integers(i + 1, len(chunks))), chunks[i])
    elif mutation == "drop":
        del chunks[draw(st.integers(0, len(chunks) - 1))]
    elif mutation == "shift-offset":
        i = draw(st.integers(0, len(chunks) - 1))
        true = chunks[i].chunk.offset
        offset = draw(st.integers(0, 2**64 - 1).filter(lambda o: o != true))
        chunks[i] = chunk(offset, chunks[i].chunk.data)
    elif mutation == "empty-chunk":
        i = draw(st.integers(0, len(chunks)))
        offset = chunks[i].chunk.offset if i < len(chunks) else len(payload)
        chunks.insert(i, chunk(offset, b""))
    elif mutation == "size-lie":
        size = draw(
            st.one_of(
                st.just(0),
                st.integers(1, 2**64 - 1).filter(lambda s: s != len(payload)),
                st.integers(len(payload) - 8, len(payload) + 8).filter(lambda s: s != len(payload)),
            )
        )
        header.header.payload.size = size
    elif mutation == "hash-lie":
        digest = bytearray(header.header.payload.blake3)
        digest[draw(st.integers(0, 31))] ^= draw(st.integers(1, 255))
        header.header.payload.blake3 = bytes(digest)
    elif mutation == "hash-length":
        header.header.payload.blake3 = draw(st.binary(max_size=64).filter(lambda d: len(d) != 32))
    elif mutation == "encoding":
        header.header.payload.encoding = draw(
            st.text(max_size=20).filter(lambda e: e != "safetensors")
        )
    elif mutation == "no-header":
        return _raw(chunks)
    elif mutation == "header-twice":
        chunks.insert(draw(st.integers(0, len(chunks))), header)
    elif mutation == "header-only":
        chunks = []
    elif mutation == "no-payload":
        header.header.ClearField("payload")
    elif mutation.startswith("trailer-"):
        return _raw(_broken_trailer(draw, mutation, header, chunks, payload))
    elif mutation == "bad-count":
        header.header.num_examples = draw(st.sampled_from([0, 10**12, 2**64 - 1]))
    else:
        bad = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        header.header.metrics["loss"] = bad
    return _raw([header, *chunks])


def _broken_trailer(
    draw: st.DrawFn,
    mutation: str,
    header: pb.ResultMessage,
    chunks: list[pb.ResultMessage],
    payload: bytes,
) -> list[pb.ResultMessage]:
    """An upload whose digest comes after the chunks (as fedlink's client sends it), broken."""
    digest = payload_digest(payload)
    if mutation == "trailer-lie":
        wrong = bytearray(digest)
        wrong[draw(st.integers(0, 31))] ^= draw(st.integers(1, 255))
        digest = bytes(wrong)
    elif mutation == "trailer-length":
        digest = draw(st.binary(max_size=64).filter(lambda d: len(d) != 32))
    trailer = pb.ResultMessage(trailer=pb.PayloadTrailer(blake3=digest))
    if mutation != "trailer-and-header":
        header.header.payload.ClearField("blake3")
    if mutation == "trailer-missing":
        return [header, *chunks]
    if mutation == "trailer-twice":
        return [header, *chunks, trailer, trailer]
    if mutation == "trailer-early":
        return [header, *chunks[:-1], trailer, chunks[-1]]
    return [header, *chunks, trailer]


# --- crafted safetensors -------------------------------------------------------------------------

SAFETENSORS_MUTATIONS = (
    "overlap",
    "offsets-out-of-range",
    "offsets-reversed",
    "offsets-not-numbers",
    "absurd-shape",
    "shape-same-count",
    "unknown-dtype",
    "other-dtype",
    "header-length",
    "header-not-json",
    "header-not-object",
    "entry-not-object",
    "missing-field",
    "extra-tensor",
    "missing-tensor",
    "data-truncated",
    "data-extended",
)


def split_safetensors(payload: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack("<Q", payload[:8])
    return json.loads(payload[8 : 8 + length]), payload[8 + length :]


def join_safetensors(header: Any, data: bytes, length: int | None = None) -> bytes:
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@st.composite
def crafted_safetensors(draw: st.DrawFn, payload: bytes) -> bytes:
    """A safetensors document derived from the honest one with its structure broken: the wire
    checks (size, digest) pass, so the parser and the validator must catch it."""
    header, data = split_safetensors(payload)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    begin, end = entry["data_offsets"]
    mutation = draw(st.sampled_from(SAFETENSORS_MUTATIONS))
    huge = st.integers(2**31, 2**64 - 1)
    if mutation == "overlap":
        others = [n for n in names if n != name and header[n]["data_offsets"][1] > 0]
        if not others or end == 0:
            mutation = "offsets-out-of-range"
        else:
            victim = header[draw(st.sampled_from(others))]
            start = draw(st.integers(0, victim["data_offsets"][1] - 1))
            entry["data_offsets"] = [start, start + (end - begin)]
            if entry["data_offsets"] == [begin, end]:
                entry["data_offsets"] = [start + 1, start + 1 + (end - begin)]
    if mutation == "offsets-out-of-range":
        entry["data_offsets"] = [
            begin,
            draw(st.one_of(huge, st.integers(len(data) + 1, len(data) + 64))),
        ]
    elif mutation == "offsets-reversed":
        entry["data_offsets"] = [end + draw(st.integers(1, 64)), begin]
    elif mutation == "offsets-not-numbers":
        entry["data_offsets"] = draw(
            st.sampled_from(
                [[-1, end], [begin], [begin, end, end], ["0", str(end)], None, [0.5, end]]
            )
        )
    elif mutation == "absurd-shape":
        entry["shape"] = draw(
            st.one_of(
                st.lists(huge, min_size=1, max_size=4),
                st.just([-1]),
                st.lists(st.just(1), min_size=200, max_size=300).map(lambda d: [*d, 2]),
                st.just([2**32, 2**32, 2**32, 2**32]),
            )
        )
    elif mutation == "shape-same-count":
        count = 1
        for dim in entry["shape"]:
            count *= dim
        reshaped = draw(st.sampled_from([[count], [1, count], [count, 1], [*entry["shape"], 1]]))
        entry["shape"] = reshaped if reshaped != entry["shape"] else [1, *entry["shape"]]
    elif mutation == "unknown-dtype":
        entry["dtype"] = draw(
            st.one_of(
                st.sampled_from(["F8_E4M3", "F8_E5M2", "C64", "U64", "U32", "U16", "Q4", ""]),
                st.text(max_size=12).filter(lambda t: t not in SAFETENSORS_DTYPES),
            )
        )
    elif mutation == "other-dtype":
        entry["dtype"] = draw(
            st.sampled_from([d for d in SAFETENSORS_DTYPES if d != entry["dtype"]])
        )
    elif mutation == "header-length":
        text = json.dumps(header).encode()
        length = draw(
            st.one_of(
                st.integers(len(text) + len(data) + 1, 2**64 - 1),
                st.integers(0, len(text) - 1),
            )
        )
        return join_safetensors(text, data, length)
    elif mutation == "header-not-json":
        text = draw(st.one_of(st.binary(min_size=1, max_size=64), st.just(b"\xff\xfe{}")))
        if text.strip().startswith(b"{") and text.strip().endswith(b"}"):
            text = b"{" + text
        return join_safetensors(text, data)
    elif mutation == "header-not-object":
        return join_safetensors(
            json.dumps(draw(st.sampled_from([[], [header], 1, "x", None]))).encode(), data
        )
    elif mutation == "entry-not-object":
        header[name] = draw(st.sampled_from([[], 1, "F32", None, [entry]]))
    elif mutation == "missing-field":
        del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif mutation == "extra-tensor":
        extra = draw(st.text(min_size=1, max_size=20).filter(lambda n: n not in header))
        header[extra] = {"dtype": "U8", "shape": [1], "data_offsets": [len(data), len(data) + 1]}
        data += b"\x00"
    elif mutation == "missing-tensor":
        del header[name]
        if end > begin:  # keep the buffer consistent so only the manifest check can catch it
            data = data[:begin] + data[end:]
            for other in header.values():
                if isinstance(other, dict) and "data_offsets" in other:
                    a, b = other["data_offsets"]
                    if a >= end:
                        other["data_offsets"] = [a - (end - begin), b - (end - begin)]
    elif mutation == "data-truncated":
        if not data:
            return join_safetensors(header, b"", len(json.dumps(header)) + 1)
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "data-extended":
        data += draw(st.binary(min_size=1, max_size=64))
    return join_safetensors(header, data)


# --- stale and replayed task ids ----------------------------------------------------------------


@st.composite
def stale_headers(
    draw: st.DrawFn, task: pb.TaskHeader, history: list[pb.TaskHeader]
) -> tuple[str, int]:
    """A (task id, round) pair that is not the current task: an earlier round's, a near miss of
    the current one, the current one with another round, or invented.

    Only state-independent values are drawn (kinds, indices, text), then resolved against the
    task and history, so hypothesis sees the same choices whatever round the coordinator is in.
    """
    current = task.task_id
    near_misses = [
        current.upper(),
        current[:-1],
        current + "0",
        current + "\x00",
        " " + current,
        current[::-1],
    ]
    kind = draw(st.sampled_from(["past", "near-miss", "invented", "empty", "current"]))
    index = draw(st.integers(0, 1 << 16))
    invented = draw(st.text(max_size=64))
    if kind == "past" and len(history) > 1:
        task_id = history[index % len(history)].task_id
    elif kind == "invented":
        task_id = invented
    elif kind == "empty":
        task_id = ""
    elif kind == "current":
        task_id = current
    else:
        task_id = near_misses[index % len(near_misses)]
    if task_id == current and kind != "current":
        task_id += "x"  # a past or invented id can only equal the live one by accident
    round_kind = draw(st.sampled_from(["current", "past", "any"]))
    any_round = draw(st.integers(0, 2**32 - 1))
    if round_kind == "current":
        round_number = task.round
    elif round_kind == "past":
        round_number = history[index % len(history)].round
    else:
        round_number = any_round
    if task_id == current and round_number == task.round:
        round_number = (round_number + 1) % 2**32  # the live task: only the round is stale
    return task_id, round_number


def stale_upload(
    task: pb.TaskHeader, task_id: str, round_number: int, payload: bytes
) -> list[bytes]:
    header = result_header(task, payload)
    header.header.task_id = task_id
    header.header.round = round_number
    return _raw([header, *chunked(payload)])


def honest_payload(client: FuzzClient) -> bytes:
    return encode_state(client.honest_state())


# --- the families of cases ------------------------------------------------------------------------


def protobuf_case(client: FuzzClient, data: st.DataObject) -> None:
    """Malformed protobuf bytes in an upload stream."""
    messages = data.draw(malformed_streams(client.task(), honest_payload(client)))
    allowed = [*REFUSED_UPLOAD, grpc.StatusCode.FAILED_PRECONDITION]
    client.send("protobuf", messages, allowed=allowed)
    client.settle()


def chunks_case(client: FuzzClient, data: st.DataObject) -> None:
    """The honest payload in a broken chunk sequence or under a lying header."""
    messages = data.draw(chunk_sequences(client.task(), honest_payload(client)))
    client.send("chunks", messages, allowed=REFUSED_UPLOAD)
    client.settle()


def safetensors_case(client: FuzzClient, data: st.DataObject) -> None:
    """A crafted safetensors document, sent with the right size and digest, so only the tensor
    parser and the validator stand in the way."""
    payload = data.draw(crafted_safetensors(honest_payload(client)))
    client.send(
        "safetensors", upload(client.task(), payload), allowed=[grpc.StatusCode.INVALID_ARGUMENT]
    )
    client.settle()


def stale_case(client: FuzzClient, data: st.DataObject) -> None:
    """An honest payload for an earlier, mistyped or invented task id or round."""
    task = client.task()
    task_id, round_number = data.draw(stale_headers(task, client.history))
    messages = stale_upload(task, task_id, round_number, honest_payload(client))
    client.send("stale-task", messages, allowed=[grpc.StatusCode.FAILED_PRECONDITION])
    # The live task was untouched: this client's one submission for it is still available.
    if client.settle() != grpc.StatusCode.INVALID_ARGUMENT:
        raise ServerFailure("a refused stale upload used up the client's submission")


@st.composite
def extreme_updates(draw: st.DrawFn, state: dict[str, torch.Tensor]) -> tuple[bytes, int]:
    """A well-formed update with finite but extreme values: some or all floating tensors set to
    (or scaled by) something near their dtype's largest value or far beyond the global model,
    under any sample count. Returns the payload and the sample count."""
    floats = [name for name, t in state.items() if t.dtype.is_floating_point]
    chosen = draw(st.lists(st.sampled_from(floats), min_size=1, unique=True))
    forged = dict(state)
    for name in chosen:
        tensor = state[name]
        largest = float(torch.finfo(tensor.dtype).max)
        magnitude = draw(
            st.sampled_from([1e4, 1e6, 1e12, 1e20, 1e30, 1e38, 3.0e38, largest / 2, largest])
        )
        magnitude = min(magnitude, largest)
        sign = draw(st.sampled_from([1.0, -1.0]))
        if draw(st.booleans()):
            forged[name] = torch.full_like(tensor, sign * magnitude)
        else:  # one element only: invisible to a mean, not to a bound
            spiked = tensor.clone().reshape(-1)
            where = draw(st.floats(0.0, 1.0, exclude_max=True))
            spiked[int(where * spiked.numel())] = sign * magnitude
            forged[name] = spiked.reshape(tensor.shape)
    return encode_state(forged), draw(st.integers(1, 1000))


def extreme_case(client: FuzzClient, data: st.DataObject) -> None:
    """Finite but extreme values: must be refused before they reach the aggregate."""
    task = client.task()  # pulls the global model that honest_state starts from
    payload, num_examples = data.draw(extreme_updates(client.honest_state()))
    messages = [result_header(task, payload), *chunked(payload)]
    messages[0].header.num_examples = num_examples
    client.send("extreme", _raw(messages), allowed=[grpc.StatusCode.INVALID_ARGUMENT])
    client.settle()


OUTSIDER_REQUESTS = {
    "/fedlink.v1.Federation/Join": pb.JoinRequest,
    "/fedlink.v1.Federation/Heartbeat": pb.HeartbeatRequest,
    "/fedlink.v1.Federation/Leave": pb.LeaveRequest,
    "/fedlink.v1.Federation/PullTask": pb.PullTaskRequest,
    "/fedlink.v1.Federation/PushResult": pb.ResultMessage,
    "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest,
}


def outsider_case(client: FuzzClient, data: st.DataObject) -> None:
    """Random bytes to every method from a CA-signed client that is not on the allow-list. A
    unary request is parsed first (unparseable: INVALID_ARGUMENT), then the caller is checked
    (PERMISSION_DENIED); a stream's messages are read only after the caller was checked. The
    health service answers anyone with a certificate."""
    path = data.draw(st.sampled_from(sorted(OUTSIDER_REQUESTS)))
    blob = data.draw(st.binary(max_size=256))
    channel = client.outsider
    code = grpc.StatusCode.OK
    try:
        if path.endswith("/PushResult"):
            channel.stream_unary(path)(iter([blob]), timeout=client.timeout)
        elif path.endswith("/PullTask"):
            list(channel.unary_stream(path)(blob, timeout=client.timeout))
        else:
            channel.unary_unary(path)(blob, timeout=client.timeout)
    except grpc.RpcError as error:
        code = error.code()
    if path.endswith("/PushResult"):
        expected = {grpc.StatusCode.PERMISSION_DENIED}
    elif unparseable(OUTSIDER_REQUESTS[path])(blob):
        expected = {grpc.StatusCode.INVALID_ARGUMENT}
    elif path.startswith("/grpc.health"):
        expected = {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}  # NOT_FOUND: unknown service
    else:
        expected = {grpc.StatusCode.PERMISSION_DENIED}
    client.outcomes[("outsider", code.name)] += 1
    if code not in expected:
        raise ServerFailure(
            f"outsider {path}: expected {sorted(c.name for c in expected)}, got {code.name}"
        )


# The coordinator's default max_health_watches_per_client.
WATCH_LIMIT = 4
HEALTH_SERVICES = st.sampled_from(["", "fedlink.v1.Federation", "unknown"]) | st.text(max_size=32)


def _first_answer(watch: Any) -> str:
    """The first status a Watch stream reports, or the gRPC code that ended it."""
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status))
    except grpc.RpcError as error:
        return str(error.code().name)


def health_stream_case(client: FuzzClient, data: st.DataObject) -> None:
    """Health Watch streams held open: refused to a caller off the allow-list, at most
    WATCH_LIMIT at a time to an allowed one (a cancelled stream gives its slot back, at once or
    a moment later), and neither holds a handler thread."""
    request = health_pb2.HealthCheckRequest(service=data.draw(HEALTH_SERVICES))
    outsiders = [
        health_pb2_grpc.HealthStub(client.outsider).Watch(request, timeout=client.timeout)
        for _ in range(data.draw(st.integers(0, 24)))
    ]
    mine = [
        health_pb2_grpc.HealthStub(client.channel).Watch(request, timeout=client.timeout)
        for _ in range(data.draw(st.integers(1, 2 * WATCH_LIMIT)))
    ]
    try:
        outcomes = [_first_answer(watch) for watch in [*outsiders, *mine]]
    finally:
        for watch in [*outsiders, *mine]:
            watch.cancel()
    for outcome in outcomes:
        client.outcomes[("health-stream", outcome)] += 1
    if any(outcome != "PERMISSION_DENIED" for outcome in outcomes[: len(outsiders)]):
        raise ServerFailure(f"a Watch off the allow-list was not refused: {outcomes}")
    admitted = [o for o in outcomes[len(outsiders) :] if o != "RESOURCE_EXHAUSTED"]
    if len(admitted) > WATCH_LIMIT or any(o.startswith(("UNKNOWN", "INTERNAL")) for o in admitted):
        raise ServerFailure(f"Watch streams of one allowed client: {outcomes[len(outsiders) :]}")


def handshake_less_case(client: FuzzClient, data: st.DataObject) -> None:
    """TCP connections that never complete a TLS handshake: silent, or sending bytes that are
    not a ClientHello (HTTP/2's preface in clear, a truncated TLS record, noise), held a moment
    and dropped. The coordinator must then still answer a health check on an honest channel."""
    host, port = client.address.rsplit(":", 1)
    payloads = st.sampled_from(
        [b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"\x16\x03\x01\x02\x00\x01"]
    ) | st.binary(max_size=64)
    connections = []
    try:
        for payload in data.draw(st.lists(payloads, min_size=1, max_size=48)):
            connection = socket.create_connection((host, int(port)), timeout=client.timeout)
            if payload:
                connection.sendall(payload)
            connections.append(connection)
        time.sleep(data.draw(st.floats(0, 0.2)))
    finally:
        for connection in connections:
            connection.close()
    client.outcomes[("handshake-less", "CLOSED")] += len(connections)
    reply = health_pb2_grpc.HealthStub(client.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=client.timeout
    )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise ServerFailure("after handshake-less connections the coordinator is not SERVING")


FAMILIES: dict[str, Callable[[FuzzClient, st.DataObject], None]] = {
    "protobuf": protobuf_case,
    "chunks": chunks_case,
    "safetensors": safetensors_case,
    "stale-task": stale_case,
    "extreme": extreme_case,
    "outsider": outsider_case,
    "health-stream": health_stream_case,
    "handshake-less": handshake_less_case,
}
