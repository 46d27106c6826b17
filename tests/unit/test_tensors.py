"""Tests for state_dict encoding: safetensors only, every state_dict dtype, hostile bytes refused."""

from __future__ import annotations

import gc
import json
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from fedlink.common.errors import TensorFormatError
from fedlink.common.tensors import (
    SUPPORTED_DTYPES,
    TensorSpec,
    encode_state,
    first_difference,
    manifest_digest,
    manifest_entries,
    manifest_of,
    open_state_file,
    save_state_file,
    state_payload,
)
from fedlink.common.wire import PayloadFile, payload_digest


def decode_state(data: bytes) -> dict[str, torch.Tensor]:
    """Decode bytes the way the coordinator does with an upload: from a file, memory-mapped."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "payload.safetensors"
        path.write_bytes(data)
        with open_state_file(path) as state:
            return {name: tensor.clone() for name, tensor in state.items()}


def _mixed_state() -> dict[str, torch.Tensor]:
    """One tensor of every dtype a real state_dict carries, with values that show precision."""
    generator = torch.Generator().manual_seed(0)
    return {
        "linear.weight": torch.randn(4, 3, generator=generator),
        "half.weight": torch.randn(5, generator=generator).to(torch.float16),
        "bf16.weight": torch.randn(2, 3, generator=generator).to(torch.bfloat16),
        "double.weight": torch.tensor([1.0 + 1e-12, -2.5e-300, 3.0], dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(2**60 + 1, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "pixels": torch.tensor([0, 127, 255], dtype=torch.uint8),
        "int32.counts": torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        "int16.counts": torch.tensor([-7, 7], dtype=torch.int16),
        "int8.counts": torch.tensor([-128, 127], dtype=torch.int8),
        "scalar": torch.tensor(0.5),
        "empty": torch.zeros(0, 3),
    }


def _assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


def _safetensors_bytes(header: dict[str, Any], data: bytes) -> bytes:
    """Hand-built safetensors: 8-byte little-endian header length, JSON header, raw data."""
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def test_round_trip_preserves_every_dtype_shape_and_value_exactly() -> None:
    state = _mixed_state()
    assert {t.dtype for t in state.values()} == SUPPORTED_DTYPES
    _assert_same_state(decode_state(encode_state(state)), state)


def test_round_trip_of_a_real_module_state_dict_with_batchnorm_counter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model(torch.randn(2, 1, 5, 5))  # one training step bumps num_batches_tracked
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    assert int(state["1.num_batches_tracked"]) == 1
    _assert_same_state(decode_state(encode_state(state)), dict(state))


def test_encoded_payload_is_safetensors_not_pickle() -> None:
    data = encode_state({"w": torch.ones(2)})
    header_length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + header_length])
    assert header["w"] == {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    assert not data.startswith(b"\x80")  # pickle protocol marker
    assert not data.startswith(b"PK")  # torch.save zip archive


def test_tied_weights_sharing_storage_are_encoded_as_separate_copies() -> None:
    embedding = nn.Embedding(5, 3)
    head = nn.Linear(3, 5, bias=False)
    head.weight = embedding.weight  # tied, as in language models
    state = {"embedding.weight": embedding.weight, "head.weight": head.weight}
    assert state["embedding.weight"].data_ptr() == state["head.weight"].data_ptr()
    decoded = decode_state(encode_state(state))
    assert torch.equal(decoded["embedding.weight"], embedding.weight.detach())
    assert torch.equal(decoded["head.weight"], embedding.weight.detach())


def test_views_into_one_storage_encode_with_their_own_values() -> None:
    base = torch.arange(10.0)
    state = {"first": base[2:5], "second": base[5:7], "strided": base[::3]}
    decoded = decode_state(encode_state(state))
    assert decoded["first"].tolist() == [2.0, 3.0, 4.0]
    assert decoded["second"].tolist() == [5.0, 6.0]
    assert decoded["strided"].tolist() == [0.0, 3.0, 6.0, 9.0]


def test_encoding_does_not_modify_or_detach_the_callers_tensors() -> None:
    weight = nn.Parameter(torch.ones(3))
    encode_state({"w": weight, "w_tied": weight})
    assert weight.requires_grad
    assert torch.equal(weight.detach(), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.float8_e4m3fn, torch.uint16])
def test_encode_refuses_unsupported_dtype_naming_the_tensor(dtype: torch.dtype) -> None:
    with pytest.raises(TensorFormatError, match="'odd' has unsupported dtype"):
        encode_state({"odd": torch.zeros(2).to(dtype)})


def test_manifest_records_dtype_and_shape_of_each_tensor() -> None:
    state = {"w": torch.zeros(2, 3, dtype=torch.float16), "n": torch.tensor(4)}
    assert manifest_of(state) == {
        "w": TensorSpec(torch.float16, (2, 3)),
        "n": TensorSpec(torch.int64, ()),
    }


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\x80\x04}\x94.",  # a pickled empty dict: must be refused, never unpickled
        b"\xff" * 8 + b"{}",  # header length far beyond the buffer
        struct.pack("<Q", 2) + b"{[",  # header is not JSON
    ],
    ids=["empty", "garbage", "pickle", "huge-header-length", "bad-json"],
)
def test_decode_refuses_bytes_that_are_not_safetensors(data: bytes) -> None:
    with pytest.raises(TensorFormatError, match="not a valid safetensors payload"):
        decode_state(data)


def test_decode_refuses_truncated_payload() -> None:
    data = encode_state({"w": torch.ones(100)})
    with pytest.raises(TensorFormatError, match="not a valid safetensors payload"):
        decode_state(data[:-1])


def test_decode_accepts_hand_built_safetensors() -> None:
    # Guards the helper below: the rejections that follow differ from this only in one field.
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    decoded = decode_state(_safetensors_bytes(header, struct.pack("<2f", 1.5, -2.0)))
    assert decoded["w"].tolist() == [1.5, -2.0]


def test_decode_refuses_overlapping_tensor_offsets() -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with pytest.raises(TensorFormatError, match="not a valid safetensors payload"):
        decode_state(_safetensors_bytes(header, bytes(12)))


def test_decode_refuses_offsets_beyond_the_buffer() -> None:
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    with pytest.raises(TensorFormatError, match="not a valid safetensors payload"):
        decode_state(_safetensors_bytes(header, bytes(8)))


def test_decode_refuses_shape_that_disagrees_with_offsets() -> None:
    header = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(TensorFormatError, match="not a valid safetensors payload"):
        decode_state(_safetensors_bytes(header, bytes(8)))


def test_decode_refuses_trailing_bytes_not_covered_by_the_header() -> None:
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(TensorFormatError, match="not a valid safetensors payload"):
        decode_state(_safetensors_bytes(header, bytes(12)))


def test_decode_refuses_unknown_dtype_string() -> None:
    header = {"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}
    with pytest.raises(TensorFormatError, match="not a valid safetensors payload"):
        decode_state(_safetensors_bytes(header, bytes(4)))


@pytest.mark.parametrize(("dtype", "nbytes"), [("U16", 2), ("C64", 8), ("F8_E4M3", 1), ("U64", 8)])
def test_decode_refuses_safetensors_dtypes_fedlink_does_not_support(
    dtype: str, nbytes: int
) -> None:
    header = {"odd": {"dtype": dtype, "shape": [1], "data_offsets": [0, nbytes]}}
    with pytest.raises(TensorFormatError, match="'odd' has unsupported dtype"):
        decode_state(_safetensors_bytes(header, bytes(nbytes)))


def test_open_state_file_gives_the_same_tensors_as_decode(tmp_path: Path) -> None:
    state = _mixed_state()
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode_state(state))
    with open_state_file(path) as loaded:
        _assert_same_state(loaded, state)
        _assert_same_state(loaded, decode_state(path.read_bytes()))


def test_open_state_file_refuses_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode_state({"w": torch.ones(100)})[:-4])
    with (
        pytest.raises(TensorFormatError, match="not a valid safetensors payload"),
        open_state_file(path),
    ):
        pass


def test_open_state_file_refuses_corrupted_header(tmp_path: Path) -> None:
    data = bytearray(encode_state({"w": torch.ones(4)}))
    data[8] = ord("[")  # the JSON header must be an object
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(data))
    with (
        pytest.raises(TensorFormatError, match="not a valid safetensors payload"),
        open_state_file(path),
    ):
        pass


def test_open_state_file_refuses_unsupported_dtype(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    header = {"odd": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}
    path.write_bytes(_safetensors_bytes(header, bytes(8)))
    with (
        pytest.raises(TensorFormatError, match="'odd' has unsupported dtype"),
        open_state_file(path),
    ):
        pass


def test_open_state_file_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TensorFormatError), open_state_file(tmp_path / "absent.safetensors"):
        pass


def test_reading_a_state_file_again_and_again_leaves_no_objects_behind(tmp_path: Path) -> None:
    # The coordinator reads every update twice per round for as long as it runs: a few bytes
    # kept per tensor read (safetensors' get_tensor kept two ints) add up to unbounded growth.
    path = tmp_path / "model.safetensors"
    save_state_file({f"layer{i}": torch.ones(300) for i in range(8)}, path)

    def read() -> None:
        with open_state_file(path) as state:
            assert sum(t.numel() for t in state.values()) == 2400

    for _ in range(50):  # first-use caches
        read()
    gc.collect()
    before = sys.getallocatedblocks()
    for _ in range(1000):
        read()
    gc.collect()
    # 2 leaked ints x 8 tensors x 1000 reads would be 16,000 blocks.
    assert sys.getallocatedblocks() - before < 800


def test_save_state_file_is_readable_and_leaves_no_temp_file(tmp_path: Path) -> None:
    state = _mixed_state()
    path = tmp_path / "model.safetensors"
    save_state_file(state, path)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert path.read_bytes() == encode_state(state)
    with open_state_file(path) as loaded:
        _assert_same_state(loaded, state)


def test_save_state_file_replaces_by_rename_not_by_rewriting_in_place(tmp_path: Path) -> None:
    # A reader holding the old file (here: a hard link to it) must never see a half-written one.
    path = tmp_path / "model.safetensors"
    save_state_file({"w": torch.zeros(3)}, path)
    old_bytes = path.read_bytes()
    os.link(path, tmp_path / "reader-view")
    save_state_file({"w": torch.ones(3)}, path)
    assert (tmp_path / "reader-view").read_bytes() == old_bytes
    assert decode_state(path.read_bytes())["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "reader-view"]


def test_save_state_file_keeps_previous_file_when_encoding_fails(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_state_file({"w": torch.zeros(3)}, path)
    before = path.read_bytes()
    with pytest.raises(TensorFormatError):
        save_state_file({"w": torch.zeros(3, dtype=torch.complex64)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_the_model_fingerprint_depends_on_names_dtypes_and_shapes_but_not_values() -> None:
    state = {"b": torch.zeros(2), "a": torch.ones(3, 4, dtype=torch.float16)}
    entries = manifest_entries(manifest_of(state))
    assert entries == [("a", "float16", (3, 4)), ("b", "float32", (2,))]
    same_shapes = manifest_entries(manifest_of({"a": torch.rand(3, 4).half(), "b": torch.rand(2)}))
    assert manifest_digest(same_shapes) == manifest_digest(entries)
    for other in (
        {"a": torch.ones(3, 4, dtype=torch.float16), "b": torch.zeros(3)},
        {"a": torch.ones(3, 4), "b": torch.zeros(2)},
        {"a": torch.ones(3, 4, dtype=torch.float16), "c": torch.zeros(2)},
    ):
        assert manifest_digest(manifest_entries(manifest_of(other))) != manifest_digest(entries)


def test_first_difference_names_the_first_tensor_in_name_order() -> None:
    theirs = [("a", "float32", (2,)), ("b", "float32", (3,)), ("c", "int64", ())]
    assert first_difference(theirs, theirs) is None
    assert first_difference(theirs, [("a", "float32", (2,)), ("b", "float16", (3,))]) == (
        "'b' is float32 [3] at the coordinator but float16 [3] here"
    )
    assert first_difference(theirs, theirs[:2]) == (
        "'c' (int64 []) is missing from this client's model"
    )
    assert first_difference(theirs, [*theirs, ("d", "float32", (1,))]) == (
        "'d' is in this client's model but not in the coordinator's"
    )


def test_safetensors_own_loader_reads_what_fedlink_writes() -> None:
    """fedlink writes the format itself (state_payload); safetensors is its only reader."""
    state = {**_mixed_state(), 'naïve "quoted" name': torch.ones(2)}
    decoded = safetensors.torch.load(encode_state(state))
    _assert_same_state(dict(decoded), state)


def test_every_tensor_starts_aligned_to_its_element_size() -> None:
    data = encode_state(_mixed_state())
    header_size = int.from_bytes(data[:8], "little")
    assert (8 + header_size) % 8 == 0  # the header is padded with spaces
    assert data[8 + header_size - 1 : 8 + header_size] in (b"}", b" ")
    header = json.loads(data[8 : 8 + header_size])
    for name, info in header.items():
        itemsize = _mixed_state()[name].element_size()
        assert (8 + header_size + info["data_offsets"][0]) % itemsize == 0, name


def test_state_payload_streams_the_tensors_memory_hashed_once(tmp_path: Path) -> None:
    state = {"w": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(3)}
    payload = state_payload(state)
    streamed = b"".join(part for _, parts in payload.chunks(64 << 10) for part in parts)
    assert streamed == encode_state(state)
    assert payload.info.size == len(streamed)
    assert payload.info.blake3 == payload_digest(streamed)
    # No copy was taken: the payload is a view of the tensors (which must not change before it
    # is sent; a change shows in the bytes, and the receiver refuses the stale digest).
    state["w"][0] = 42.0
    assert b"".join(part for _, parts in payload.chunks(64 << 10) for part in parts) != streamed


def test_save_state_file_describes_the_file_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "global.safetensors"
    written = save_state_file(_mixed_state(), path)
    assert written.info == PayloadFile.seal(path).info
