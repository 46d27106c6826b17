"""State dicts as safetensors: the only tensor format fedlink reads or writes.

safetensors stores names, dtypes, shapes and raw little-endian bytes, so decoding it can never
execute code (unlike Python object serialization, which fedlink never uses for tensors).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from fedlink.common.errors import TensorFormatError
from fedlink.common.storage import commit

StateDict = dict[str, torch.Tensor]

# Every dtype a PyTorch state_dict holds in practice; anything else is refused on decode.
SUPPORTED_DTYPES: frozenset[torch.dtype] = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


@dataclass(frozen=True)
class TensorSpec:
    """The part of a tensor that must match between an update and the global model."""

    dtype: torch.dtype
    shape: tuple[int, ...]


Manifest = dict[str, TensorSpec]


def manifest_of(state: Mapping[str, torch.Tensor]) -> Manifest:
    return {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in state.items()}


def encode_state(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a state_dict to safetensors bytes in memory."""
    return safetensors.torch.save(_prepare(state))


@contextmanager
def open_state_file(path: Path) -> Iterator[StateDict]:
    """Memory-map a safetensors file: tensors are read lazily, so memory stays bounded by what
    is touched and is released when the context exits."""
    try:
        handle = safetensors.safe_open(str(path), framework="pt")
    except Exception as exc:
        raise TensorFormatError(f"not a valid safetensors payload: {exc}") from exc
    with handle as f:
        try:
            state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
        except Exception as exc:
            raise TensorFormatError(f"not a valid safetensors payload: {exc}") from exc
        _check_dtypes(state)
        yield state


def save_state_file(state: Mapping[str, torch.Tensor], path: Path, *, durable: bool = True) -> None:
    """Write a state_dict as a safetensors file atomically (temp file, fsync, rename).

    safetensors writes straight from the tensors' memory, so no second copy of the model is
    ever held, which is what keeps the coordinator's memory at O(model) for 100M+ parameters.
    `durable=False` skips the fsync for scratch files that need not survive a crash.
    """
    tmp = path.with_name(path.name + ".tmp")
    safetensors.torch.save_file(_prepare(state), str(tmp))
    if not durable:
        tmp.replace(path)
        return
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    commit(tmp, path)


def _prepare(state: Mapping[str, torch.Tensor]) -> StateDict:
    """CPU, contiguous tensors of supported dtypes; tied (shared-storage) tensors copied."""
    tensors: StateDict = {}
    seen_storages: set[int] = set()
    for name, tensor in state.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TensorFormatError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
        cpu = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (tied weights); give each its own copy.
        ptr = cpu.untyped_storage().data_ptr()
        if ptr in seen_storages and cpu.numel() > 0:
            cpu = cpu.clone()
        seen_storages.add(ptr)
        tensors[name] = cpu
    return tensors


def _check_dtypes(state: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in state.items():
        if tensor.dtype not in SUPPORTED_DTYPES:
            raise TensorFormatError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
