"""Chunk messages framed and read by common/frames.py: byte for byte protobuf's own encoding,
and read exactly as protobuf reads them, whatever a sender puts on the wire."""

from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from fedlink.common.frames import (
    PULL_TASK,
    PUSH_RESULT,
    ChunkView,
    chunk_message,
    message_reader,
    serialize,
    trailed_chunks,
)
from fedlink.common.wire import PayloadBuffers, payload_digest
from fedlink.server.inprocess import HandlerCollector
from fedlink.server.service import add_federation_service
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

OFFSETS = [0, 1, 127, 128, 16_383, 16_384, 1 << 20, (1 << 32) + 5, (1 << 63) - 1]
SIZES = [1, 127, 128, 300, 16_383, 16_384, 1 << 20]


def protobuf_chunk(
    message_type: type[pb.TaskMessage | pb.ResultMessage], offset: int, data: bytes
) -> bytes:
    return message_type(chunk=pb.Chunk(offset=offset, data=data)).SerializeToString()


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", SIZES)
def test_a_framed_chunk_is_what_protobuf_writes(offset: int, size: int) -> None:
    data = random.Random(size).randbytes(size)
    framed = chunk_message(offset, [data])
    assert framed == protobuf_chunk(pb.TaskMessage, offset, data)
    assert framed == protobuf_chunk(pb.ResultMessage, offset, data)


def test_a_chunk_is_framed_from_several_buffers_copied_once() -> None:
    data = bytes(range(256)) * 40
    parts = [memoryview(data)[:5], memoryview(data)[5:5000], data[5000:]]
    assert chunk_message(42, parts) == protobuf_chunk(pb.TaskMessage, 42, data)


def test_a_negative_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        chunk_message(-1, [b"x"])


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("size", [0, *SIZES[:4]])
def test_a_chunk_is_read_as_a_view_of_the_received_message(offset: int, size: int) -> None:
    data = random.Random(offset).randbytes(size)
    message = protobuf_chunk(pb.ResultMessage, offset, data)
    chunk = message_reader(pb.ResultMessage)(message)
    assert isinstance(chunk, ChunkView)
    assert (chunk.offset, bytes(chunk.data)) == (offset, data)
    if size:  # the canonical layout: no copy, the data is the message's own tail
        assert chunk.data.obj is message and chunk.data.readonly


def test_an_upload_ends_with_a_trailer_holding_the_digest_of_its_chunks() -> None:
    data = random.Random(7).randbytes(10_000)
    buffers = [data[:3], memoryview(data)[3:9_000], data[9_000:]]
    messages = list(trailed_chunks(PayloadBuffers(buffers), 4096))
    read = message_reader(pb.ResultMessage)
    *chunks, trailer = [read(serialize(m)) for m in messages]
    assert all(isinstance(c, ChunkView) for c in chunks)
    assert [c.offset for c in chunks] == [0, 4096, 8192]
    assert b"".join(bytes(c.data) for c in chunks) == data
    assert isinstance(trailer, pb.ResultMessage) and trailer.WhichOneof("message") == "trailer"
    assert trailer.trailer.blake3 == payload_digest(data)


def test_other_messages_are_parsed_by_protobuf() -> None:
    header = pb.TaskMessage(header=pb.TaskHeader(task_id="t", round=3, kind=pb.TASK_KIND_TRAIN))
    read = message_reader(pb.TaskMessage)(serialize(header))
    assert read == header
    assert message_reader(pb.TaskMessage)(b"") == pb.TaskMessage()  # neither header nor chunk


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    tag = bytes([number << 3 | wire_type])
    if wire_type == 0:
        return tag + payload
    return tag + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


# Valid encodings of a chunk that are not the canonical one: protobuf's reading of each holds.
UNUSUAL = {
    "data before offset": _field(2, 2, _field(2, 2, b"abc") + _field(1, 0, _varint(9))),
    "offset twice (last wins)": _field(
        2, 2, _field(1, 0, _varint(1)) + _field(1, 0, _varint(7)) + _field(2, 2, b"abc")
    ),
    "data twice (last wins)": _field(2, 2, _field(2, 2, b"first") + _field(2, 2, b"second")),
    "unknown field after data": _field(2, 2, _field(2, 2, b"abc") + _field(9, 0, _varint(1))),
    "chunk field twice (merged)": _field(2, 2, _field(1, 0, _varint(5)))
    + _field(2, 2, _field(2, 2, b"abc")),
    "header then chunk (oneof: last wins)": _field(1, 2, b"") + _field(2, 2, _field(2, 2, b"z")),
    "empty chunk": _field(2, 2, b""),
    "overlong offset varint": _field(
        2, 2, b"\x08" + b"\x81" + b"\x80" * 8 + b"\x00" + _field(2, 2, b"q")
    ),
    "non-minimal length": b"\x12\x85\x00" + _field(2, 2, b"abc"),
}


@pytest.mark.parametrize("encoding", UNUSUAL.values(), ids=list(UNUSUAL))
def test_unusual_encodings_read_as_protobuf_reads_them(encoding: bytes) -> None:
    _assert_read_like_protobuf(encoding)


def test_malformed_messages_are_refused_as_protobuf_refuses_them() -> None:
    good = chunk_message(1 << 20, [b"payload bytes"])
    for broken in (good[:-1], good[:3], good + b"\x12", b"\x12\xff", b"\x12\x05\x12\x09abc"):
        with pytest.raises(DecodeError):
            pb.ResultMessage.FromString(broken)
        with pytest.raises(DecodeError):
            message_reader(pb.ResultMessage)(broken)


def test_any_mutation_of_a_chunk_message_reads_as_protobuf_reads_it() -> None:
    """The fast path never accepts what protobuf would read differently, nor refuse what it
    reads: every byte flipped, dropped or added in framed chunks."""
    rng = random.Random(7)
    for offset, size in [(0, 3), (300, 200), ((1 << 40) + 3, 130)]:
        message = chunk_message(offset, [rng.randbytes(size)])
        for _ in range(1500):
            mutated = bytearray(message)
            position = rng.randrange(min(len(mutated), 16))  # the framing is at the front
            match rng.randrange(3):
                case 0:
                    mutated[position] = rng.randrange(256)
                case 1:
                    del mutated[position]
                case _:
                    mutated.insert(position, rng.randrange(256))
            _assert_read_like_protobuf(bytes(mutated))


def _assert_read_like_protobuf(encoding: bytes) -> None:
    try:
        expected = pb.ResultMessage.FromString(encoding)
    except DecodeError:
        with pytest.raises(DecodeError):
            message_reader(pb.ResultMessage)(encoding)
        return
    read = message_reader(pb.ResultMessage)(encoding)
    if expected.WhichOneof("message") == "chunk":
        assert isinstance(read, ChunkView)
        assert (read.offset, bytes(read.data)) == (expected.chunk.offset, expected.chunk.data)
    else:
        assert read == expected


def test_the_federation_service_registers_every_method_with_framed_payload_streams() -> None:
    registered = HandlerCollector()
    add_federation_service(pb_grpc.FederationServicer(), registered)
    service = pb.DESCRIPTOR.services_by_name["Federation"]
    assert set(registered.methods) == {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert registered.methods[PULL_TASK].response_serializer is serialize
    chunk = registered.methods[PUSH_RESULT].request_deserializer(chunk_message(0, [b"x"]))
    assert isinstance(chunk, ChunkView)
