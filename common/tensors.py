"""State dicts as safetensors: the only tensor format fedlink reads or writes.

safetensors stores names, dtypes, shapes and raw little-endian bytes, so decoding it can never
execute code (unlike Python object serialization, which fedlink never uses for tensors).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

from fedlink.common.errors import TensorFormatError
from fedlink.common.storage import commit, replacing
from fedlink.common.wire import ENCODING, PayloadBuffers

StateDict = dict[str, torch.Tensor]

# Every dtype a PyTorch state_dict holds in practice, by its name in a safetensors header;
# anything else is refused on decode.
_HEADER_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SUPPORTED_DTYPES: frozenset[torch.dtype] = frozenset(_HEADER_DTYPES.values())
_DTYPE_NAMES = {dtype: name for name, dtype in _HEADER_DTYPES.items()}

# Received chunks are read-only bytes, and torch warns (once per process) that a tensor over
# them could write to them; `received_view`'s tensors are only ever read. The one warning is
# spent here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.frombuffer(bytes(1), dtype=torch.uint8)


def received_view(data: bytes | memoryview, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """A tensor over received bytes, with no copy; it must only be read."""
    return torch.frombuffer(data, dtype=dtype)


@dataclass(frozen=True)
class TensorSpec:
    """The part of a tensor that must match between an update and the global model."""

    dtype: torch.dtype
    shape: tuple[int, ...]


Manifest = dict[str, TensorSpec]


def manifest_of(state: Mapping[str, torch.Tensor]) -> Manifest:
    return {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in state.items()}


# A manifest as plain text fields (name, dtype without "torch.", shape), in name order: what
# travels in JoinReply, so either side compares without turning a peer's strings into dtypes.
ManifestEntries = list[tuple[str, str, tuple[int, ...]]]


def manifest_entries(manifest: Manifest) -> ManifestEntries:
    return [
        (name, str(spec.dtype).removeprefix("torch."), spec.shape)
        for name, spec in sorted(manifest.items())
    ]


def manifest_digest(entries: ManifestEntries) -> bytes:
    """The model's fingerprint: SHA-256 over its names, dtypes and shapes (not its values)."""
    digest = hashlib.sha256()
    for name, dtype, shape in entries:
        digest.update(f"{name}\t{dtype}\t{','.join(map(str, shape))}\n".encode())
    return digest.digest()


def first_difference(expected: ManifestEntries, actual: ManifestEntries) -> str | None:
    """The first tensor (in name order) where `actual` differs from `expected`, described."""
    theirs = {name: (dtype, shape) for name, dtype, shape in expected}
    ours = {name: (dtype, shape) for name, dtype, shape in actual}
    for name in sorted(theirs.keys() | ours.keys()):
        if name not in ours:
            dtype, shape = theirs[name]
            return f"{name!r} ({dtype} {list(shape)}) is missing from this client's model"
        if name not in theirs:
            return f"{name!r} is in this client's model but not in the coordinator's"
        if theirs[name] != ours[name]:
            (d1, s1), (d2, s2) = theirs[name], ours[name]
            return f"{name!r} is {d1} {list(s1)} at the coordinator but {d2} {list(s2)} here"
    return None


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a state_dict to safetensors bytes in memory."""
    return state_payload(state).to_bytes()


@contextmanager
def open_state_file(path: Path) -> Iterator[StateDict]:
    """Memory-map a safetensors file: tensors are read lazily, so memory stays bounded by what
    is touched and is released when the context exits.

    safetensors checks the header (offsets, dtypes, shapes, no gaps or trailing bytes); the
    tensors are then mapped here rather than with its `get_tensor`, which leaks two Python ints
    per tensor (the slice bounds it builds; measured with safetensors 0.4.5 to 0.8.0): about
    64 bytes per tensor read, which the coordinator does twice per update, every round.
    """
    yield map_state_file(path)


def map_state_file(path: Path) -> StateDict:
    """`open_state_file` without the context: the mapping lives as long as its tensors."""
    try:
        with safetensors.safe_open(str(path), framework="pt"):
            pass  # a header it accepts
        return _map_tensors(path)
    except TensorFormatError:
        raise
    except Exception as exc:
        raise TensorFormatError(f"not a valid safetensors payload: {exc}") from exc


def _map_tensors(path: Path) -> StateDict:
    """The tensors of a safetensors file whose header safetensors has accepted, as views of one
    private, read-only-on-disk mapping of the file (as safetensors itself maps it)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        slots = header_slots(f.read(header_size), size)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    # Views of one tensor over the whole file: tensors that lie back to back in the file do
    # in memory too, in one storage, so a run of them can be read as one (server/inspection.py).
    whole = torch.asarray(storage, dtype=torch.uint8)
    state: StateDict = {}
    for slot in slots:
        if slot.start % slot.dtype.itemsize == 0:
            raw = whole[slot.start : slot.stop]
        else:  # a view as a wider dtype must start aligned to it: this one gets its own storage
            raw = torch.asarray(storage[slot.start : slot.stop], dtype=torch.uint8)
        state[slot.name] = raw.view(slot.dtype).reshape(slot.shape)
    return state


@dataclass(frozen=True)
class TensorSlot:
    """Where one tensor's bytes lie in a safetensors payload (offsets from its first byte)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


def header_slots(header: bytes, size: int) -> list[TensorSlot]:
    """The tensors a safetensors header (the JSON after the 8-byte length) places in a payload
    of `size` bytes, in header order: the one reading of the layout, shared by the file mapping
    and the check of an update as it arrives (server/inspection.py), so both see the same
    tensors in the same bytes."""
    base = 8 + len(header)
    try:
        entries = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFormatError(f"not a valid safetensors header: {exc}") from None
    if not isinstance(entries, dict):
        raise TensorFormatError("not a valid safetensors header: not a JSON object")
    slots = []
    for name, info in entries.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _HEADER_DTYPES.get(info["dtype"])
            if dtype is None:
                raise TensorFormatError(f"tensor {name!r} has unsupported dtype {info['dtype']}")
            shape = tuple(int(n) for n in info["shape"])
            start, stop = (base + int(offset) for offset in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TensorFormatError(f"tensor {name!r} has a malformed header entry") from None
        if stop - start != math.prod(shape) * dtype.itemsize or not base <= start <= stop <= size:
            raise TensorFormatError(f"tensor {name!r} does not match its data offsets")
        slots.append(TensorSlot(name, dtype, shape, start, stop))
    return slots


# The longest safetensors header held in memory while a payload streams in: room for every
# expected tensor with a long name, not safetensors' own 100 MB limit, which every stream in
# flight could otherwise make a process hold. A longer header is left to safetensors, reading
# the payload from a file (the coordinator's read-back check, a client's spool).
HEADER_BYTES_BASE = 64 << 10
HEADER_BYTES_PER_TENSOR = 1 << 10


class StreamedHeader:
    """The header of a safetensors payload of `size` bytes, read as its first bytes stream in:
    the 8-byte length, then the JSON, held only up to the limit for `tensors` expected tensors.
    `slots` is set once it is complete (`header_slots`); `refused` once it is empty, too long
    or not a header that `header_slots` accepts. `bytes` is what was taken of the stream."""

    def __init__(self, size: int, tensors: int) -> None:
        self.size = size
        self.limit = HEADER_BYTES_BASE + HEADER_BYTES_PER_TENSOR * tensors
        self.bytes = bytearray()
        self.slots: list[TensorSlot] | None = None
        self.refused = False

    def feed(self, view: memoryview) -> memoryview:
        """Take the header's part of `view`; the rest of it is returned (nothing while the
        header goes on; the bytes after it once it is complete, or not taken once refused)."""
        while self.slots is None and not self.refused:
            need = 8
            if len(self.bytes) >= 8:
                length = int.from_bytes(self.bytes[:8], "little")
                if not 0 < length <= self.limit or 8 + length > self.size:
                    self.refused = True
                    break
                need += length
            take = need - len(self.bytes)
            self.bytes += view[:take]
            view = view[take:]
            if len(self.bytes) < need:
                break  # (all of `view` was taken: the header goes on in the next bytes)
            if need > 8:
                try:
                    self.slots = header_slots(bytes(self.bytes[8:]), self.size)
                except TensorFormatError:
                    self.refused = True
        return view


def save_state_file(
    state: Mapping[str, torch.Tensor], path: Path, *, durable: bool = True
) -> PayloadBuffers:
    """Write a state_dict as a safetensors file atomically (temp file, fsync, rename).

    The bytes come straight from the tensors' memory (`state_payload`), so no second copy of the
    model is ever held, which is what keeps the coordinator's memory at O(model) for 100M+
    parameters. `durable=False` skips the fsync for scratch files that need not survive a crash.
    Returns what was written: its `info` (size, digest) is computed from memory when first
    asked for, so a file to be served need not be read back to be described.
    """
    payload = state_payload(state)
    write_payload_file(payload, path, durable=durable)
    return payload


def write_payload_file(
    payload: PayloadBuffers, path: Path, *, durable: bool = True, reuse: Path | None = None
) -> None:
    """`payload` as the file `path`, atomically (see save_state_file). `reuse`: a file nothing
    reads any more, rewritten in place (and cut to size) instead of a new file being made."""
    with replacing(path) as tmp:
        if reuse is not None and reuse.exists():
            reuse.replace(tmp)
        with os.fdopen(os.open(tmp, os.O_RDWR | os.O_CREAT, 0o666), "r+b") as f:
            payload.write_to(f)
            f.truncate()
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if durable:
            commit(tmp, path)
        else:
            tmp.replace(path)


def state_payload(state: Mapping[str, torch.Tensor], encoding: str = ENCODING) -> PayloadBuffers:
    """A state_dict as a safetensors payload made of the tensors' own memory: the one writer of
    the format in fedlink (files, in-memory bytes, a client's update streamed without a file).

    A client's update used to be written to a file by safetensors, read back to hash it and
    read again to send it: for a 400 MB model, 400 MB of new page cache every round, which a VM
    that hands freed memory back to its host makes several times dearer than the copy itself
    (docs/large-models.md). The header is the format safetensors reads (8-byte little-endian
    length, JSON, space padding to 8 bytes, then the data); every reader of it is safetensors,
    and the tests check that it reads every dtype and shape back unchanged. Tensors are ordered
    by element size, largest first, so each stays aligned to its element size, as safetensors
    orders them."""
    tensors = _prepare(state)
    if sys.byteorder != "little":  # the tensors' memory is written as it is
        raise TensorFormatError("safetensors is little-endian: fedlink writes it only there")
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-(8 + len(text)) % 8)
    data = [_raw_bytes(tensors[name]) for name in order]
    return PayloadBuffers([len(text).to_bytes(8, "little"), text, *data], encoding)


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's memory as bytes, without a copy (any dtype, 0-d included)."""
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _prepare(state: Mapping[str, torch.Tensor]) -> StateDict:
    """CPU, contiguous tensors of supported dtypes (no copy of what already is one; tied
    tensors are written twice from the same memory, each under its own name)."""
    tensors: StateDict = {}
    for name, tensor in state.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TensorFormatError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors
