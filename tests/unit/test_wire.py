"""Tests for chunked payloads: splitting bytes into chunks and reassembling them safely."""

from __future__ import annotations

import gc
import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from blake3 import blake3

from fedlink.common.errors import PayloadError, PayloadIncomplete
from fedlink.common.wire import (
    ENCODING,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    PayloadAssembler,
    PayloadBuffers,
    PayloadFile,
    PayloadInfo,
    check_chunk_size,
    payload_digest,
)

CHUNK = MIN_CHUNK_SIZE


def _payload(size: int) -> bytes:
    return os.urandom(size)


_FILES = Path(tempfile.mkdtemp(prefix="fedlink-wire-"))


def _sealed(data: bytes) -> PayloadFile:
    """The payload as fedlink sends it: a file, described once, streamed in chunks."""
    path = _FILES / f"{hashlib.sha256(data).hexdigest()}-{len(data)}"
    path.write_bytes(data)
    return PayloadFile.seal(path)


def describe(data: bytes) -> PayloadInfo:
    return _sealed(data).info


def iter_chunks(data: bytes, chunk_size: int) -> list[tuple[int, bytes]]:
    return [(offset, b"".join(parts)) for offset, parts in _sealed(data).chunks(chunk_size)]


def streamed(chunks: Iterable[tuple[int, Sequence[bytes | memoryview]]]) -> bytes:
    """The bytes of a payload's chunks (or of the rest of a stream of them), in order."""
    return b"".join(part for _, parts in chunks for part in parts)


def _assembler(data: bytes, *, max_size: int | None = None) -> tuple[PayloadAssembler, io.BytesIO]:
    sink = io.BytesIO()
    limit = len(data) if max_size is None else max_size
    return PayloadAssembler(describe(data), sink, max_size=limit), sink


def test_describe_announces_size_digest_and_safetensors_encoding() -> None:
    data = b"fedlink payload"
    info = describe(data)
    assert info.size == len(data)
    assert info.blake3 == blake3(data).digest()  # the reference implementation's digest
    assert info.encoding == ENCODING == "safetensors"


def test_in_order_chunks_are_reassembled_byte_for_byte() -> None:
    data = _payload(3 * CHUNK + 17)
    assembler, sink = _assembler(data)
    for offset, chunk in iter_chunks(data, CHUNK):
        assembler.add(offset, chunk)
    assembler.finish()
    assert sink.getvalue() == data
    assert assembler.received == len(data)


def test_chunks_of_any_size_are_accepted_when_contiguous() -> None:
    # The receiver checks offsets, not the sender's chunk size.
    data = _payload(100)
    assembler, sink = _assembler(data)
    for start, end in [(0, 1), (1, 40), (40, 99), (99, 100)]:
        assembler.add(start, data[start:end])
    assembler.finish()
    assert sink.getvalue() == data


def test_chunk_ahead_of_expected_offset_is_rejected() -> None:
    data = _payload(2 * CHUNK)
    assembler, sink = _assembler(data)
    with pytest.raises(
        PayloadError, match=f"offset {CHUNK} arrived out of order; expected offset 0"
    ):
        assembler.add(CHUNK, data[CHUNK:])
    assert sink.getvalue() == b""
    assert assembler.received == 0


def test_duplicate_chunk_is_rejected() -> None:
    data = _payload(2 * CHUNK)
    assembler, sink = _assembler(data)
    assembler.add(0, data[:CHUNK])
    with pytest.raises(PayloadError, match="out of order"):
        assembler.add(0, data[:CHUNK])
    assert sink.getvalue() == data[:CHUNK]
    assert assembler.received == CHUNK


def test_empty_chunk_is_rejected() -> None:
    data = _payload(10)
    assembler, _ = _assembler(data)
    with pytest.raises(PayloadError, match="empty chunk at offset 0"):
        assembler.add(0, b"")


def test_chunks_beyond_announced_size_are_rejected_before_being_stored() -> None:
    data = _payload(100)
    assembler, sink = _assembler(data, max_size=1000)
    assembler.add(0, data[:60])
    with pytest.raises(PayloadError, match="exceed the announced payload size of 100 bytes"):
        assembler.add(60, data[60:] + b"extra")
    assert sink.getvalue() == data[:60]
    assert assembler.received == 60


def test_truncated_payload_fails_on_finish() -> None:
    data = _payload(100)
    assembler, _ = _assembler(data)
    assembler.add(0, data[:99])
    with pytest.raises(PayloadError, match="truncated: received 99 of 100 bytes"):
        assembler.finish()


def test_payload_with_no_chunks_fails_on_finish() -> None:
    assembler, _ = _assembler(_payload(10))
    with pytest.raises(PayloadError, match="received 0 of 10"):
        assembler.finish()


def test_payload_not_matching_announced_digest_fails_on_finish() -> None:
    data = _payload(100)
    tampered = bytes([data[0] ^ 0xFF]) + data[1:]
    assembler, _ = _assembler(data)
    assembler.add(0, tampered)
    with pytest.raises(PayloadError, match="BLAKE3 digest does not match"):
        assembler.finish()


@pytest.mark.parametrize("digest_length", [0, 16, 31, 33, 64])
def test_digest_that_is_not_32_bytes_is_rejected(digest_length: int) -> None:
    info = PayloadInfo(size=10, blake3=b"\x00" * digest_length)
    with pytest.raises(PayloadError, match="must be 32 bytes"):
        PayloadAssembler(info, io.BytesIO(), max_size=100)


def _trailed(data: bytes) -> tuple[PayloadAssembler, io.BytesIO]:
    """An assembler for an upload whose header left the digest for a trailer."""
    sink = io.BytesIO()
    info = PayloadInfo(size=len(data), blake3=b"")
    return PayloadAssembler(info, sink, max_size=len(data), digest_after=True), sink


def test_a_digest_in_a_trailer_is_checked_like_one_in_the_header() -> None:
    data = _payload(3 * CHUNK + 5)
    assembler, sink = _trailed(data)
    for offset, chunk in iter_chunks(data, CHUNK):
        assembler.add(offset, chunk)
    assembler.add_trailer(payload_digest(data))
    assembler.finish()
    assert sink.getvalue() == data

    tampered, _ = _trailed(data)
    tampered.add(0, data[:-1] + bytes([data[-1] ^ 1]))
    tampered.add_trailer(payload_digest(data))
    with pytest.raises(PayloadError, match="BLAKE3 digest does not match"):
        tampered.finish()


def test_an_upload_without_its_trailer_is_incomplete() -> None:
    data = _payload(100)
    assembler, _ = _trailed(data)
    assembler.add(0, data)
    with pytest.raises(PayloadIncomplete, match="trailer missing"):
        assembler.finish()


def test_a_download_must_announce_its_digest_first() -> None:
    # Only an upload may send its digest last: a download is checked before it is used.
    info = PayloadInfo(size=10, blake3=b"")
    with pytest.raises(PayloadError, match="must be 32 bytes"):
        PayloadAssembler(info, io.BytesIO(), max_size=100)


def test_trailers_that_break_the_protocol_are_refused() -> None:
    data = _payload(100)
    digest = payload_digest(data)
    assembler, _ = _trailed(data)
    with pytest.raises(PayloadError, match="must be 32 bytes"):
        assembler.add_trailer(digest[:16])
    assembler.add(0, data[:50])
    assembler.add_trailer(digest)
    with pytest.raises(PayloadError, match="second payload trailer"):
        assembler.add_trailer(digest)
    with pytest.raises(PayloadError, match="after the payload's trailer"):
        assembler.add(50, data[50:])
    announced, _ = _assembler(data)
    with pytest.raises(PayloadError, match="header already gave the digest"):
        announced.add_trailer(digest)


@pytest.mark.parametrize("size", [0, -1])
def test_non_positive_announced_size_is_rejected(size: int) -> None:
    info = PayloadInfo(size=size, blake3=payload_digest(b""))
    with pytest.raises(PayloadError, match="size must be positive"):
        PayloadAssembler(info, io.BytesIO(), max_size=100)


def test_announced_size_over_receiver_limit_is_rejected() -> None:
    info = describe(_payload(101))
    with pytest.raises(PayloadError, match="101 bytes exceeds the limit of 100 bytes"):
        PayloadAssembler(info, io.BytesIO(), max_size=100)


def test_announced_size_equal_to_receiver_limit_is_accepted() -> None:
    data = _payload(100)
    assembler, sink = _assembler(data, max_size=100)
    assembler.add(0, data)
    assembler.finish()
    assert sink.getvalue() == data


@pytest.mark.parametrize("encoding", ["pickle", "", "SAFETENSORS", "torch"])
def test_unsupported_encoding_is_rejected(encoding: str) -> None:
    data = _payload(10)
    info = PayloadInfo(size=len(data), blake3=payload_digest(data), encoding=encoding)
    with pytest.raises(PayloadError, match="unsupported payload encoding"):
        PayloadAssembler(info, io.BytesIO(), max_size=100)


@pytest.mark.parametrize(
    ("size", "expected_offsets"),
    [
        (1, [0]),
        (CHUNK - 1, [0]),
        (CHUNK, [0]),
        (CHUNK + 1, [0, CHUNK]),
        (3 * CHUNK, [0, CHUNK, 2 * CHUNK]),
        (3 * CHUNK + 5, [0, CHUNK, 2 * CHUNK, 3 * CHUNK]),
    ],
)
def test_iter_chunks_splits_at_chunk_boundaries(size: int, expected_offsets: list[int]) -> None:
    data = _payload(size)
    chunks = list(iter_chunks(data, CHUNK))
    assert [offset for offset, _ in chunks] == expected_offsets
    assert all(len(chunk) == CHUNK for _, chunk in chunks[:-1])
    assert 0 < len(chunks[-1][1]) <= CHUNK
    assert b"".join(chunk for _, chunk in chunks) == data


def test_iter_chunks_exact_multiple_has_no_empty_trailing_chunk() -> None:
    chunks = list(iter_chunks(_payload(4 * CHUNK), CHUNK))
    assert len(chunks) == 4
    assert [len(chunk) for _, chunk in chunks] == [CHUNK] * 4


def test_iter_chunks_of_empty_payload_yields_nothing() -> None:
    assert list(iter_chunks(b"", CHUNK)) == []


def test_iter_chunks_yields_bytes_not_views() -> None:
    # Chunks go into protobuf messages, which need real bytes.
    (_, chunk), *_ = iter_chunks(_payload(10), CHUNK)
    assert type(chunk) is bytes


def test_iter_chunks_refuses_out_of_range_chunk_size() -> None:
    with pytest.raises(PayloadError, match="chunk size"):
        list(iter_chunks(_payload(10), MIN_CHUNK_SIZE - 1))


@pytest.mark.parametrize("chunk_size", [MIN_CHUNK_SIZE, MIN_CHUNK_SIZE + 1, MAX_CHUNK_SIZE])
def test_check_chunk_size_accepts_bounds_inclusive(chunk_size: int) -> None:
    check_chunk_size(chunk_size)


@pytest.mark.parametrize("chunk_size", [-1, 0, MIN_CHUNK_SIZE - 1, MAX_CHUNK_SIZE + 1])
def test_check_chunk_size_rejects_out_of_range_with_valid_range_in_message(chunk_size: int) -> None:
    with pytest.raises(PayloadError, match=f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"):
        check_chunk_size(chunk_size)


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_every_stream_of_a_payload_reads_through_one_descriptor_closed_with_the_payload() -> None:
    # 10,000 clients downloading the global model at once ran a coordinator out of descriptors
    # when each stream opened the file.
    data = _payload(3 * CHUNK)
    payload = _sealed(data)
    before = _open_descriptors()
    streams = [payload.chunks(CHUNK) for _ in range(200)]
    firsts = [next(stream) for stream in streams]
    assert _open_descriptors() - before == 1
    assert all(first == (0, [data[:CHUNK]]) for first in firsts)
    assert streamed(streams[0]) == data[CHUNK:]
    del streams, firsts, payload
    gc.collect()
    assert _open_descriptors() == before


def test_a_payload_keeps_streaming_the_sealed_file_after_its_path_is_replaced() -> None:
    data = _payload(2 * CHUNK)
    payload = _sealed(data)
    stream = payload.chunks(CHUNK)
    assert next(stream) == (0, [data[:CHUNK]])
    replacement = payload.path.with_suffix(".next")
    replacement.write_bytes(_payload(2 * CHUNK))
    replacement.replace(payload.path)  # as an atomic rewrite of the same path would
    assert streamed(payload.chunks(CHUNK)) == data


@pytest.mark.parametrize("chunk_size", [CHUNK, CHUNK + 3, 5 * CHUNK])
def test_buffers_stream_in_full_chunks_across_buffer_boundaries(chunk_size: int) -> None:
    parts = [_payload(n) for n in (7, CHUNK - 7, 0, 3 * CHUNK + 1, 1, 2 * CHUNK)]
    data = b"".join(parts)
    payload = PayloadBuffers(parts)
    chunks = [(offset, list(parts)) for offset, parts in payload.chunks(chunk_size)]
    assert [offset for offset, _ in chunks] == list(range(0, len(data), chunk_size))
    assert all(sum(len(p) for p in parts) == chunk_size for _, parts in chunks[:-1])
    # Views of the buffers, not copies: framing the message is the only copy (frames.py).
    assert all(type(part) is memoryview for _, parts in chunks for part in parts)
    assert streamed(chunks) == data
    assert payload.info == describe(data)


def test_buffers_are_received_like_a_sealed_file() -> None:
    parts = [_payload(CHUNK + 1), _payload(2 * CHUNK - 1)]
    payload = PayloadBuffers(parts)
    sink = io.BytesIO()
    assembler = PayloadAssembler(payload.info, sink, max_size=payload.info.size)
    for offset, chunk in payload.chunks(CHUNK):
        assembler.add(offset, b"".join(chunk))
    assembler.finish()
    assert sink.getvalue() == b"".join(parts)


def test_a_payload_knows_whether_a_stream_is_reading_it() -> None:
    payload = _sealed(_payload(3 * CHUNK))
    assert not payload.streaming()
    finished, abandoned = payload.chunks(CHUNK), payload.chunks(CHUNK)
    assert not payload.streaming()  # not begun: nothing read yet
    next(finished), next(abandoned)
    assert payload.streaming()
    list(finished)
    assert payload.streaming()  # the abandoned one is still open
    abandoned.close()  # as when a download's call is cancelled
    assert not payload.streaming()
