"""Update codecs (common/codecs.py): each round-trips within its stated error, top-k keeps what
it did not send, and a hostile payload (scales, indices, lengths) is refused before use."""

from __future__ import annotations

import math

import pytest
import torch

from fedlink.common.codecs import UpdateCodec, compress_update, decompress_update
from fedlink.common.errors import ConfigError, UpdateRejected
from fedlink.common.tensors import StateDict, encode_state, manifest_of


def _models() -> tuple[StateDict, StateDict]:
    generator = torch.Generator().manual_seed(1)
    base = {
        "fc.weight": torch.randn(300, 70, generator=generator),
        "fc.bias": torch.randn(300, generator=generator),
        "empty": torch.zeros(0),
        "norm.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }
    trained = {
        name: (
            t + 0.01 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t + 1
        )
        for name, t in base.items()
    }
    return base, trained


def _round_trip(
    codec: UpdateCodec, residual: StateDict | None = None
) -> tuple[StateDict, StateDict]:
    base, trained = _models()
    payload, kept = compress_update(codec, trained, base, residual or {})
    return decompress_update(codec, payload, base, manifest_of(base)), kept


@pytest.mark.parametrize(
    ("codec", "relative_error", "absolute_error"),
    [
        # float16 keeps 11 significant bits, bfloat16 8: relative error 2^-11 and 2^-8 per entry;
        # below float16's normal range (6e-5) its subnormals' step is 2^-24.
        (UpdateCodec("fp16"), 2**-11, 2**-25),
        (UpdateCodec("bf16"), 2**-8, 0.0),
    ],
)
def test_float_codecs_round_trip_within_their_precision(
    codec: UpdateCodec, relative_error: float, absolute_error: float
) -> None:
    base, trained = _models()
    decoded, kept = _round_trip(codec)
    assert kept == {}
    for name, tensor in trained.items():
        assert decoded[name].dtype == tensor.dtype and decoded[name].shape == tensor.shape
        if not tensor.is_floating_point():
            assert torch.equal(decoded[name], tensor)
            continue
        change = tensor - base[name]
        error = (decoded[name] - tensor).abs()
        # The change's rounding, plus float32's own in taking the change and adding it back.
        bound = change.abs() * relative_error + tensor.abs() * 2**-22 + absolute_error
        assert bool((error <= bound).all()), name


@pytest.mark.parametrize("block_size", [0, 64, 1024])
def test_int8_error_is_at_most_half_a_step_of_its_block_scale(block_size: int) -> None:
    codec = UpdateCodec("int8", block_size=block_size)
    base, trained = _models()
    decoded, _ = _round_trip(codec)
    for name in ("fc.weight", "fc.bias"):
        change = (trained[name] - base[name]).reshape(-1)
        width = change.numel() if block_size == 0 else block_size
        blocks = math.ceil(change.numel() / width)
        padded = torch.zeros(blocks * width)
        padded[: change.numel()] = change.abs()
        step = padded.reshape(blocks, width).amax(dim=1).repeat_interleave(width)[: change.numel()]
        error = (decoded[name] - trained[name]).reshape(-1).abs()
        assert bool((error <= step / 254 + trained[name].reshape(-1).abs() * 2**-22).all()), name
    assert torch.equal(decoded["norm.num_batches_tracked"], trained["norm.num_batches_tracked"])


def test_top_k_sends_the_largest_changes_and_keeps_the_rest_for_the_next_update() -> None:
    codec = UpdateCodec("fp32", topk=0.1)
    base, trained = _models()
    decoded, kept = _round_trip(codec)
    change = (trained["fc.weight"] - base["fc.weight"]).reshape(-1)
    sent = (decoded["fc.weight"] - base["fc.weight"]).reshape(-1) != 0
    assert int(sent.sum()) == math.ceil(0.1 * change.numel())
    assert float(change[sent].abs().min()) >= float(change[~sent].abs().max())
    # Error feedback: what was sent plus what is kept is the whole change.
    total = (decoded["fc.weight"] - base["fc.weight"]).reshape(-1) + kept["fc.weight"]
    assert torch.allclose(total, change, atol=1e-6)
    # The kept part is added to the next change: with no new training, it is what goes next.
    _, again = compress_update(codec, base, base, kept)
    assert again["fc.weight"].abs().sum() < kept["fc.weight"].abs().sum()


def test_int8_with_top_k_keeps_the_rounding_error_too() -> None:
    codec = UpdateCodec("int8", block_size=16, topk=0.25)
    base, trained = _models()
    decoded, kept = _round_trip(codec)
    for name in ("fc.weight", "fc.bias"):
        change = (trained[name] - base[name]).reshape(-1)
        total = (decoded[name] - base[name]).reshape(-1) + kept[name]
        assert torch.allclose(total, change, atol=1e-5), name


def _payload(codec: UpdateCodec) -> StateDict:
    base, trained = _models()
    payload, _ = compress_update(codec, trained, base, {})
    return payload


INT8_TOPK = UpdateCodec("int8", block_size=32, topk=0.1)


def _tampered(change: str) -> StateDict:
    payload = _payload(INT8_TOPK)
    index = payload["index/fc.weight"]
    if change == "index-out-of-range":
        payload["index/fc.weight"] = torch.cat(
            [index[:-1], torch.tensor([21_000], dtype=torch.int32)]
        )
    elif change == "negative-index":
        payload["index/fc.weight"] = torch.cat([torch.tensor([-1], dtype=torch.int32), index[1:]])
    elif change == "repeated-index":
        payload["index/fc.weight"] = torch.cat([index[:1], index[:-1]])
    elif change == "too-many-indices":
        payload["index/fc.weight"] = torch.arange(3000, dtype=torch.int32)
        payload["value/fc.weight"] = torch.ones(3000, dtype=torch.int8)
    elif change == "wide-index":
        payload["index/fc.weight"] = index.long()
    elif change == "short-values":
        payload["value/fc.weight"] = payload["value/fc.weight"][:-1]
    elif change == "infinite-scale":
        payload["scale/fc.weight"][0] = float("inf")
    elif change == "negative-scale":
        payload["scale/fc.weight"][0] = -1.0
    elif change == "huge-scale":
        payload["scale/fc.weight"][0] = 3e38
        payload["value/fc.weight"][0] = 127
    elif change == "missing-scale":
        del payload["scale/fc.weight"]
    elif change == "extra-entry":
        payload["value/backdoor"] = torch.ones(4, dtype=torch.int8)
    elif change == "float-values":
        payload["value/fc.bias"] = payload["value/fc.bias"].float()
    elif change == "minus-128":
        payload["value/fc.bias"][0] = -128
    elif change == "counter-shape":
        payload["full/norm.num_batches_tracked"] = torch.zeros(2, dtype=torch.int64)
    return payload


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ("index-out-of-range", "outside the tensor"),
        ("negative-index", "outside the tensor"),
        ("repeated-index", "strictly increasing"),
        ("too-many-indices", "3000 entries"),
        ("wide-index", "expected torch.int32"),
        ("short-values", "value/fc.weight"),
        ("infinite-scale", "non-finite scale"),
        ("negative-scale", "negative"),
        ("huge-scale", "NaN or Inf"),
        ("missing-scale", "missing 'scale/fc.weight'"),
        ("extra-entry", "unexpected entries 'value/backdoor'"),
        ("float-values", "expected torch.int8"),
        ("minus-128", "-128"),
        ("counter-shape", "full/norm.num_batches_tracked"),
    ],
)
def test_a_hostile_payload_is_refused_with_what_is_wrong(change: str, says: str) -> None:
    base, _ = _models()
    with pytest.raises(UpdateRejected) as refused:
        decompress_update(INT8_TOPK, _tampered(change), base, manifest_of(base))
    assert refused.value.code == "INVALID_ARGUMENT"
    assert says in str(refused.value)


def test_fp16_refuses_a_change_it_cannot_represent() -> None:
    base, trained = _models()
    trained["fc.bias"] = trained["fc.bias"] + 1e6
    with pytest.raises(UpdateRejected, match="does not fit fp16"):
        compress_update(UpdateCodec("fp16"), trained, base, {})


def test_a_compressed_update_is_a_fraction_of_the_model_and_within_the_announced_bound() -> None:
    base, trained = _models()
    full = len(encode_state(trained))
    for codec, most in ((UpdateCodec("int8"), 0.27), (UpdateCodec("fp16"), 0.52)):
        payload, _ = compress_update(codec, trained, base, {})
        size = len(encode_state(payload))
        assert size <= most * full
        assert size <= codec.max_payload_bytes(manifest_of(base))


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"name": "int4"}, "update_codec must be one of fp32, fp16, bf16, int8"),
        ({"name": "int8", "block_size": -1}, "update_int8_block_size"),
        ({"name": "int8", "topk": 0.9}, "update_topk"),
        ({"name": "fp16", "topk": float("nan")}, "update_topk"),
    ],
)
def test_a_bad_codec_setting_is_refused(settings: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        UpdateCodec(**settings)  # type: ignore[arg-type]
