"""Update codecs: a training result sent as its change from the global model, compressed.

A federation chooses one codec (`update_codec`, with `update_int8_block_size` and `update_topk`);
each training task names it and the coordinator refuses a result encoded any other way. The
payload is still safetensors, with one entry per role and tensor:

- `value/<name>`: the change of a floating tensor, flattened, as float32, float16, bfloat16 or
  int8 (then `scale/<name>`: one float32 scale per block of `block_size` entries, or one for the
  whole tensor; entry = int8 x scale, so |error| <= scale / 2 = max|block| / 254);
- `index/<name>` with top-k: the strictly increasing flat positions of the entries sent, the
  `ceil(topk x numel)` largest in magnitude; the client keeps what it did not send (and the
  rounding error of what it sent) and adds it to its next update (error feedback);
- `full/<name>`: a tensor that is not floating (a counter), as it is.

The coordinator decodes a result back into a full-precision model (global + change) before any
check, so validation, robust rules, DP and FedAvg see plain float tensors. A malicious client
controls every scale, index and length here: decoding checks each against the global model's
manifest (names, dtypes, shapes, index range and order, finite scales) and allocates only what
the manifest says, never what the payload claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedlink.common.errors import ConfigError, UpdateRejected
from fedlink.common.tensors import Manifest, StateDict
from fedlink.common.wire import ENCODING
from fedlink.v1 import federation_pb2 as pb

CODECS = ("fp32", "fp16", "bf16", "int8")
_VALUE_DTYPES = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}
INT8_MAX = 127
DEFAULT_BLOCK_SIZE = 1024
MAX_BLOCK_SIZE = 1 << 24
# Beyond half of a tensor's entries, indices plus values outweigh the dense change.
MAX_TOPK = 0.5
# Safetensors header text per entry besides its name (dtype, shape, offsets), for the size bound.
_HEADER_BYTES_PER_ENTRY = 160


@dataclass(frozen=True)
class UpdateCodec:
    """How a federation's training results are encoded."""

    name: str = "fp32"
    block_size: int = DEFAULT_BLOCK_SIZE  # int8 only: entries per scale; 0 = per tensor
    topk: float = 0.0  # fraction of each floating tensor's entries sent; 0 = all

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ConfigError(f"update_codec must be one of {', '.join(CODECS)}, got {self.name!r}")
        if not 0 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ConfigError(
                f"update_int8_block_size must be 0 (one scale per tensor) to {MAX_BLOCK_SIZE}, "
                f"got {self.block_size}"
            )
        # Written as "not <=" so that NaN is refused too.
        if not 0.0 <= self.topk <= MAX_TOPK:
            raise ConfigError(
                f"update_topk must be 0 (send every entry) or a fraction up to {MAX_TOPK} (more "
                f"would be larger than the dense update), got {self.topk}"
            )

    @property
    def plain(self) -> bool:
        """The trained model itself, uncompressed: the original wire format."""
        return self.name == "fp32" and self.topk == 0.0

    @property
    def encoding(self) -> str:
        """The payload encoding a result in this codec is announced with."""
        if self.plain:
            return ENCODING
        return f"fedlink-delta/{self.name}" + ("+topk" if self.topk else "")

    def describe(self) -> str:
        parts = [self.name]
        if self.name == "int8":
            parts.append(f"block {self.block_size}" if self.block_size else "per-tensor scale")
        if self.topk:
            parts.append(f"top-{self.topk:g} with error feedback")
        return ", ".join(parts)

    def sent_entries(self, numel: int) -> int:
        """How many entries of a floating tensor of `numel` travel."""
        if not self.topk:
            return numel
        return min(numel, max(1, math.ceil(self.topk * numel)))

    def max_payload_bytes(self, manifest: Manifest) -> int:
        """The largest payload an honest client can send for this model: uploads announcing
        more are refused before a byte is stored."""
        total = 8
        for name, spec in manifest.items():
            numel = math.prod(spec.shape)
            total += 3 * (len(name.encode()) + 8 + _HEADER_BYTES_PER_ENTRY)  # 8: "value/"...
            if not spec.dtype.is_floating_point:
                total += numel * spec.dtype.itemsize
                continue
            sent = self.sent_entries(numel)
            total += sent * _VALUE_DTYPES[self.name].itemsize
            if self.topk:
                total += sent * _index_dtype(numel).itemsize
            if self.name == "int8":
                total += _blocks(sent, self.block_size) * 4
        return total


def codec_to_proto(codec: UpdateCodec) -> pb.UpdateCodec:
    return pb.UpdateCodec(name=codec.name, block_size=codec.block_size, topk=codec.topk)


def codec_from_proto(message: pb.UpdateCodec) -> UpdateCodec:
    """The codec a task header names, checked (ConfigError); absent = plain fp32."""
    if not message.name:
        return UpdateCodec()
    return UpdateCodec(message.name[:16], message.block_size, message.topk)


def _blocks(entries: int, block_size: int) -> int:
    return 1 if block_size == 0 else max(1, math.ceil(entries / block_size))


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= torch.iinfo(torch.int32).max else torch.int64


def compress_update(
    codec: UpdateCodec,
    trained: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor],
) -> tuple[StateDict, StateDict]:
    """The payload for `trained` (the model after local training) against `global_state` (the
    model the round started from), and the error-feedback residual to keep for next time
    (empty without top-k). `residual` is the one kept from the previous update."""
    payload: StateDict = {}
    kept: StateDict = {}
    for name, tensor in trained.items():
        if not tensor.dtype.is_floating_point:
            payload[f"full/{name}"] = tensor.detach().cpu()
            continue
        change = (tensor.detach().cpu().float() - global_state[name].cpu().float()).reshape(-1)
        previous = residual.get(name)
        if previous is not None and previous.shape == change.shape:
            change = change + previous.float()
        if codec.topk:
            sent = codec.sent_entries(change.numel())
            index = torch.topk(change.abs(), sent, sorted=False).indices.sort().values
            values = change[index]
            payload[f"index/{name}"] = index.to(_index_dtype(change.numel()))
        else:
            values = change
        encoded, scale = _quantize(codec, name, values)
        payload[f"value/{name}"] = encoded
        if scale is not None:
            payload[f"scale/{name}"] = scale
        if codec.topk:
            remainder = change.clone()
            remainder[index] -= _dequantize(codec, encoded, scale)
            kept[name] = remainder
    return payload, kept


def _quantize(
    codec: UpdateCodec, name: str, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if codec.name != "int8":
        encoded = values.to(_VALUE_DTYPES[codec.name])
        if not bool(torch.isfinite(encoded).all()):
            raise UpdateRejected(
                "INVALID_ARGUMENT",
                f"the change of tensor {name!r} does not fit {codec.name} (largest entry "
                f"{float(values.abs().max()):.3g}); this update cannot be sent with this codec",
            )
        return encoded, None
    blocks = _blocks(values.numel(), codec.block_size)
    width = max(1, values.numel()) if codec.block_size == 0 else codec.block_size
    padded = torch.zeros(blocks * width)
    padded[: values.numel()] = values
    rows = padded.reshape(blocks, width)
    scale = rows.abs().amax(dim=1) / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.round(rows / safe[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return quantized.reshape(-1)[: values.numel()].clone(), scale


def _dequantize(
    codec: UpdateCodec, encoded: torch.Tensor, scale: torch.Tensor | None
) -> torch.Tensor:
    if scale is None:
        return encoded.float()
    entries = encoded.numel()
    width = max(1, entries) if codec.block_size == 0 else codec.block_size
    per_entry = scale.repeat_interleave(width)[:entries]
    return encoded.float() * per_entry


def decompress_update(
    codec: UpdateCodec,
    payload: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    manifest: Manifest,
) -> StateDict:
    """The full model a client's encoded update stands for (global + decoded change), every
    field of the payload checked against the manifest first; UpdateRejected names what is wrong."""
    expected = set()
    for name, spec in manifest.items():
        if not spec.dtype.is_floating_point:
            expected.add(f"full/{name}")
            continue
        expected.add(f"value/{name}")
        if codec.name == "int8":
            expected.add(f"scale/{name}")
        if codec.topk:
            expected.add(f"index/{name}")
    missing = sorted(expected - payload.keys())
    if missing:
        raise _refused(f"{codec.encoding} update is missing {_names(missing)}")
    unknown = sorted(payload.keys() - expected)
    if unknown:
        raise _refused(f"{codec.encoding} update has unexpected entries {_names(unknown)}")
    state: StateDict = {}
    for name, spec in manifest.items():
        if not spec.dtype.is_floating_point:
            full = payload[f"full/{name}"]
            _expect(full, f"full/{name}", spec.dtype, spec.shape)
            state[name] = full.clone()
            continue
        numel = math.prod(spec.shape)
        index = None
        sent = numel
        if codec.topk:
            index = payload[f"index/{name}"]
            sent = index.numel()
            if not min(1, numel) <= sent <= codec.sent_entries(numel):
                raise _refused(
                    f"index/{name} has {sent} entries; this federation sends 1 to "
                    f"{codec.sent_entries(numel)} of the tensor's {numel}"
                )
            _expect(index, f"index/{name}", _index_dtype(numel), (sent,))
            _check_index(index, numel, name)
        value = payload[f"value/{name}"]
        _expect(value, f"value/{name}", _VALUE_DTYPES[codec.name], (sent,))
        scale = None
        if codec.name == "int8":
            scale = payload[f"scale/{name}"]
            _expect(scale, f"scale/{name}", torch.float32, (_blocks(sent, codec.block_size),))
            if not bool((torch.isfinite(scale) & (scale >= 0)).all()):
                raise _refused(f"scale/{name} holds a negative or non-finite scale")
            if bool((value == -INT8_MAX - 1).any()):
                raise _refused(f"value/{name} holds -128, outside the symmetric int8 range")
        change = _dequantize(codec, value, scale)
        if not bool(torch.isfinite(change).all()):
            raise _refused(f"value/{name} decodes to NaN or Inf")
        merged = global_state[name].float().reshape(-1).clone()
        if index is None:
            merged += change
        else:
            merged[index.long()] += change
        state[name] = merged.reshape(spec.shape).to(spec.dtype)
    return state


def _expect(tensor: torch.Tensor, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape:
        raise _refused(
            f"{key} is {tensor.dtype} {list(tensor.shape)}; expected {dtype} {list(shape)}"
        )


def _check_index(index: torch.Tensor, numel: int, name: str) -> None:
    """Positions in range and strictly increasing: no entry is written twice or outside."""
    wide = index.long()
    if wide.numel() == 0:
        return
    if int(wide[0]) < 0 or int(wide[-1]) >= numel:
        raise _refused(f"index/{name} points outside the tensor's {numel} entries")
    if wide.numel() > 1 and not bool((wide[1:] > wide[:-1]).all()):
        raise _refused(f"index/{name} is not strictly increasing")


def _refused(message: str) -> UpdateRejected:
    return UpdateRejected("INVALID_ARGUMENT", message)


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
