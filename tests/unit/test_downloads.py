"""Tests for download messages shared by the streams that send the same payload."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fedlink.common.frames import chunk_message, message_reader
from fedlink.common.wire import MIN_CHUNK_SIZE, PayloadBuffers, PayloadFile
from fedlink.server.downloads import SharedFrames
from fedlink.v1 import federation_pb2 as pb

CHUNK = MIN_CHUNK_SIZE


def _sealed(tmp_path: Path, data: bytes, name: str = "global.safetensors") -> PayloadFile:
    path = tmp_path / name
    path.write_bytes(data)
    return PayloadFile.seal(path)


def _expected(data: bytes) -> list[bytes]:
    return [
        chunk_message(offset, [data[offset : offset + CHUNK]])
        for offset in range(0, len(data), CHUNK)
    ]


def _payload_bytes(messages: list[bytes]) -> bytes:
    read = message_reader(pb.TaskMessage)
    return b"".join(bytes(read(message).data) for message in messages)  # type: ignore[union-attr]


def _interleaved(*streams: Iterator[tuple[bytes, int]]) -> list[list[bytes]]:
    """Every stream read to its end, a message from each in turn (as the event loop does)."""
    received: list[list[bytes]] = [[] for _ in streams]
    active = dict(enumerate(streams))
    while active:
        for index, stream in list(active.items()):
            item = next(stream, None)
            if item is None:
                del active[index]
            else:
                received[index].append(item[0])
    return received


def test_concurrent_downloads_of_the_global_model_share_each_chunk_message(
    tmp_path: Path,
) -> None:
    data = os.urandom(5 * CHUNK + 123)
    payload = _sealed(tmp_path, data)
    frames = SharedFrames()
    streams = [frames.messages(payload, CHUNK) for _ in range(4)]
    first, *others = _interleaved(*streams)
    assert first == _expected(data)  # protobuf's bytes, chunk by chunk
    for received in others:
        assert all(a is b for a, b in zip(received, first, strict=True))  # the same objects
    assert (frames.built, frames.shared) == (6, 18)


def test_a_stream_behind_the_budget_rebuilds_its_chunks_and_still_gets_the_payload(
    tmp_path: Path,
) -> None:
    data = os.urandom(8 * CHUNK)
    payload = _sealed(tmp_path, data)
    frames = SharedFrames(budget=2 * (CHUNK + 16))  # two messages
    ahead = list(frames.messages(payload, CHUNK))
    behind = list(frames.messages(payload, CHUNK))
    assert _payload_bytes([m for m, _ in ahead]) == data
    assert _payload_bytes([m for m, _ in behind]) == data
    assert [size for _, size in behind] == [CHUNK] * 8
    assert frames.built == 16  # the first chunks were dropped before the second stream came


def test_payloads_with_other_bytes_never_share_messages(tmp_path: Path) -> None:
    old = os.urandom(3 * CHUNK)
    new = os.urandom(3 * CHUNK)  # the same size and offsets: only the digest tells them apart
    frames = SharedFrames()
    received = _interleaved(
        frames.messages(_sealed(tmp_path, old, "old.safetensors"), CHUNK),
        frames.messages(_sealed(tmp_path, new, "new.safetensors"), CHUNK),
    )
    assert received == [_expected(old), _expected(new)]
    assert frames.shared == 0


def test_payloads_in_memory_are_framed_per_stream(tmp_path: Path) -> None:
    data = os.urandom(2 * CHUNK + 5)
    payload = PayloadBuffers([data[:100], data[100:]])  # a secure-aggregation message
    frames = SharedFrames()
    assert [m for m, _ in frames.messages(payload, CHUNK)] == _expected(data)
    assert (frames.built, frames.shared) == (0, 0)


def test_a_download_counts_as_reading_the_file_until_it_ends_or_is_dropped(
    tmp_path: Path,
) -> None:
    payload = _sealed(tmp_path, os.urandom(3 * CHUNK))
    frames = SharedFrames()
    finished, dropped = frames.messages(payload, CHUNK), frames.messages(payload, CHUNK)
    next(finished), next(dropped)
    assert payload.streaming()  # the retired-model logic must not rewrite it meanwhile
    list(finished)
    assert payload.streaming()
    dropped.close()  # a cancelled call
    assert not payload.streaming()
