"""The inspector measures an update fed in arbitrary pieces exactly as reading it whole does,
and gives no findings for a stream it cannot follow."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import safetensors.torch
import torch

from fedlink.common.tensors import (
    StateDict,
    encode_state,
    manifest_of,
    map_state_file,
    save_state_file,
)
from fedlink.server.inspection import UpdateInspector
from fedlink.server.validation import squared_distance


def _global() -> StateDict:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(64, 3, 5, 5, generator=generator),
        "conv.bias": torch.randn(64, generator=generator),
        "head.half": torch.randn(33, generator=generator).half(),
        "head.brain": torch.randn(17, generator=generator).bfloat16(),
        "head.double": torch.randn(3, 3, generator=generator).double(),
        "bn.num_batches_tracked": torch.tensor(7),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.empty(0),
    }


def _update(global_state: StateDict) -> StateDict:
    return {
        name: tensor + 0.25 if tensor.dtype.is_floating_point else tensor.clone()
        for name, tensor in global_state.items()
    }


def _feed(inspector: UpdateInspector, payload: bytes, pieces: list[int]) -> None:
    view, offset = memoryview(payload), 0
    for size in pieces:
        inspector.write(view[offset : offset + size])
        offset += size
    inspector.write(view[offset:])


def _random_pieces(total: int, seed: int) -> list[int]:
    rng, pieces, used = random.Random(seed), [], 0
    while used < total:
        size = rng.choice([1, 2, 3, 5, 7, 64, 1000, 4093, 65536])
        pieces.append(size)
        used += size
    return pieces


@pytest.mark.parametrize("mapped", [True, False], ids=["global-file", "separate-tensors"])
@pytest.mark.parametrize("seed", range(6))
def test_measurements_match_reading_the_whole_update_whatever_the_chunking(
    seed: int, mapped: bool, tmp_path: Path
) -> None:
    global_state = _global()
    update = _update(global_state)
    update["conv.weight"][0, 0, 0, 0] = 9.5  # the largest value, in the middle of a run
    payload = encode_state(update)
    # As the coordinator has it, the global model is one mapped file: its tensors lie back to
    # back in memory, as the update's do, and are measured a run at a time.
    reference = global_state
    if mapped:
        save_state_file(global_state, tmp_path / "global.safetensors")
        reference = map_state_file(tmp_path / "global.safetensors")
    inspector = UpdateInspector(manifest_of(global_state), len(payload), lambda: reference)
    _feed(inspector, payload, _random_pieces(len(payload), seed))

    findings = inspector.findings()
    assert findings is not None
    floating = {n for n, t in update.items() if t.dtype.is_floating_point and t.numel()}
    assert max(findings.magnitudes.values()) == 9.5
    # One entry per run: float32's three tensors are one (float64, bfloat16, float16 alone).
    assert len(findings.magnitudes) == (4 if mapped else len(floating))
    expected = sum(squared_distance(update[name], global_state[name]) for name in floating)
    assert findings.squared_distance == pytest.approx(expected, rel=1e-5)


def test_a_nan_anywhere_is_found_even_split_between_chunks() -> None:
    global_state = _global()
    update = _update(global_state)
    update["conv.weight"][10, 1, 2, 3] = math.nan
    update["head.half"][5] = math.inf
    payload = encode_state(update)
    inspector = UpdateInspector(manifest_of(global_state), len(payload))
    _feed(inspector, payload, [3] * (len(payload) // 3))
    findings = inspector.findings()
    assert findings is not None
    assert math.isnan(findings.magnitudes["conv.weight"])
    assert math.isinf(findings.magnitudes["head.half"])
    assert findings.squared_distance == 0.0  # no reference: no distance measured


def test_tensors_unlike_the_manifest_are_not_measured() -> None:
    global_state = _global()
    update = _update(global_state)
    update["conv.bias"] = torch.randn(65)  # wrong shape: the layout check refuses it
    update["stranger"] = torch.randn(4)
    payload = encode_state(update)
    inspector = UpdateInspector(manifest_of(global_state), len(payload), lambda: global_state)
    _feed(inspector, payload, [])
    findings = inspector.findings()
    assert findings is not None
    assert "conv.bias" not in findings.magnitudes
    assert "stranger" not in findings.magnitudes


@pytest.mark.parametrize(
    "mangle",
    [
        lambda p: p[:-1],  # truncated
        lambda p: p + b"\0\0\0\0",  # trailing bytes
        lambda p: (10**9).to_bytes(8, "little") + p[8:],  # a header longer than the payload
        lambda p: (0).to_bytes(8, "little") + p[8:],  # an empty header
        lambda p: p[:8] + b"[" + p[9:],  # not JSON
    ],
)
def test_a_stream_it_cannot_follow_gives_no_findings(mangle: object) -> None:
    global_state = _global()
    payload = mangle(encode_state(_update(global_state)))  # type: ignore[operator]
    announced = max(len(payload), len(encode_state(global_state)))
    inspector = UpdateInspector(manifest_of(global_state), announced, lambda: global_state)
    _feed(inspector, payload, _random_pieces(len(payload), 1))
    assert inspector.findings() is None


def test_a_header_longer_than_the_manifest_needs_is_not_held_in_memory() -> None:
    """A valid file whose header is padded with metadata to 200 kB: the inspector stops
    collecting it (an upload in flight must not make the coordinator hold 100 MB) and leaves the
    update to the read-back check."""
    global_state = {"w": torch.zeros(4)}
    update = {"w": torch.ones(4)}
    payload = bytearray(encode_state(update))
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    header["__metadata__"] = {"padding": "x" * 200_000}
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % 8)
    padded = len(text).to_bytes(8, "little") + text + payload[8 + length :]
    assert safetensors.torch.load(bytes(padded))["w"].tolist() == [1.0] * 4  # a valid file
    inspector = UpdateInspector(manifest_of(global_state), len(padded), lambda: global_state)
    _feed(inspector, bytes(padded), [])
    assert inspector.findings() is None
