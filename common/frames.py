"""Payload chunk messages, written and read without protobuf's copies.

A chunk travels as `TaskMessage{chunk: Chunk{offset, data}}` (downloads) or
`ResultMessage{chunk: ...}` (uploads): over 99.9% of fedlink's traffic. Built the usual way
(`pb.TaskMessage(chunk=pb.Chunk(offset=o, data=d)).SerializeToString()`) the data is copied
three times, at about 1 GB/s all told here; parsed, twice more. On a 2-core machine where the
coordinator and clients share the cores, that was a third of a round's CPU beyond the bare wire
(benchmarks/transport.py; docs/large-models.md).

So the chunk messages are framed here: `chunk_message` writes exactly the bytes protobuf would
write (the tests compare them byte for byte), copying the data once; `message_reader` returns the
data of a chunk message as a view into the received buffer. Only the one canonical layout is
read here; any other message, and any other encoding of a chunk (fields in another order,
repeated or unknown fields), goes to protobuf's own parser, so what is accepted, and what it
means, is exactly what protobuf decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from fedlink.common.wire import PayloadBuffers, payload_hash
from fedlink.v1 import federation_pb2 as pb

# The service whose two payload streams (PullTask's replies, PushResult's requests) use this.
FEDERATION_SERVICE: str = pb.DESCRIPTOR.services_by_name["Federation"].full_name
PULL_TASK = f"/{FEDERATION_SERVICE}/PullTask"
PUSH_RESULT = f"/{FEDERATION_SERVICE}/PushResult"

_LENGTH_DELIMITED = 2
_VARINT = 0
# Varints this long or shorter hold values below 2**63; longer ones are left to protobuf.
_MAX_FAST_VARINT_BYTES = 9


def _field(message: type[Message], name: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[name].number)


def _tag(number: int, wire_type: int) -> int:
    return number << 3 | wire_type


_CHUNK_FIELD = _field(pb.TaskMessage, "chunk")
# One framing serves both streams: their chunk fields must have the same number.
assert _field(pb.ResultMessage, "chunk") == _CHUNK_FIELD, "TaskMessage/ResultMessage differ"
_CHUNK_TAG = _tag(_CHUNK_FIELD, _LENGTH_DELIMITED)
_OFFSET_TAG = _tag(_field(pb.Chunk, "offset"), _VARINT)
_DATA_TAG = _tag(_field(pb.Chunk, "data"), _LENGTH_DELIMITED)


@dataclass(frozen=True, slots=True)
class ChunkView:
    """A received chunk: `data` is a read-only view into the message as it arrived."""

    offset: int
    data: memoryview


M = TypeVar("M", pb.TaskMessage, pb.ResultMessage)


def chunk_message(offset: int, parts: Sequence[bytes | memoryview]) -> bytes:
    """The serialized chunk message (TaskMessage or ResultMessage: the same bytes) carrying
    `offset` and the concatenation of `parts`, which are copied once, into the result."""
    if offset < 0:
        raise ValueError(f"chunk offset must not be negative, got {offset}")
    size = sum(memoryview(part).nbytes for part in parts)
    # proto3 leaves a zero offset out, as protobuf's serializer does.
    inner = (bytes([_OFFSET_TAG]) + _varint(offset) if offset else b"") + (
        bytes([_DATA_TAG]) + _varint(size)
    )
    outer = bytes([_CHUNK_TAG]) + _varint(len(inner) + size)
    return b"".join([outer, inner, *parts])


def trailed_chunks(payload: PayloadBuffers, chunk_size: int) -> Iterator[bytes | pb.ResultMessage]:
    """An upload's chunk messages, then its trailer: the digest of their bytes, hashed chunk by
    chunk as they are framed (so no pass over the whole payload comes before its first byte)."""
    digest = payload_hash()
    for offset, parts in payload.chunks(chunk_size):
        for part in parts:
            digest.update(part)
        yield chunk_message(offset, parts)
    yield pb.ResultMessage(trailer=pb.PayloadTrailer(blake3=digest.digest()))


def serialize(message: Message | bytes) -> bytes:
    """A stream's serializer: a protobuf message, or a chunk message already framed."""
    return message if isinstance(message, bytes) else message.SerializeToString()


def message_reader(message_type: type[M]) -> Callable[[bytes], M | ChunkView]:
    """A stream's deserializer: a ChunkView for a chunk message (however it was encoded), the
    parsed message otherwise. Raises protobuf's DecodeError on a malformed message."""

    def read(data: bytes) -> M | ChunkView:
        chunk = _canonical_chunk(data)
        if chunk is not None:
            return chunk
        message = message_type.FromString(data)
        if message.WhichOneof("message") == "chunk":
            return ChunkView(message.chunk.offset, memoryview(message.chunk.data))
        return message

    return read


def _canonical_chunk(data: bytes) -> ChunkView | None:
    """The chunk in `data` when it is exactly chunk{[offset], data} filling the buffer; None
    for anything else (for protobuf to parse)."""
    if not data or data[0] != _CHUNK_TAG:
        return None
    read = _read_varint(data, 1)
    if read is None or read[0] != len(data) - read[1]:
        return None
    position = read[1]
    offset = 0
    if position < len(data) and data[position] == _OFFSET_TAG:
        read = _read_varint(data, position + 1)
        if read is None:
            return None
        offset, position = read
    if position >= len(data) or data[position] != _DATA_TAG:
        return None
    read = _read_varint(data, position + 1)
    if read is None or read[0] != len(data) - read[1]:
        return None
    return ChunkView(offset, memoryview(data)[read[1] :])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int] | None:
    """(value, position after it), or None when it runs past the end or is too long here."""
    value = 0
    for index in range(_MAX_FAST_VARINT_BYTES):
        if position + index >= len(data):
            return None
        byte = data[position + index]
        value |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return value, position + index + 1
    return None
