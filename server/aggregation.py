"""Streaming weighted FedAvg: each accepted update is folded into a running weighted sum.

Server memory is one accumulator the size of the model, independent of the number of clients
(peers hold all N updates until the round ends).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedlink.common.tensors import Manifest, StateDict


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision sums lose too much; accumulate in float32 (float64 stays float64).
    return torch.float64 if dtype == torch.float64 else torch.float32


class StreamingFedAvg:
    """new = sum(n_i * w_i) / sum(n_i) over floating tensors.

    Integer and bool tensors (e.g. BatchNorm's num_batches_tracked) are counters or masks, not
    weights: averaging them is meaningless, so the element-wise maximum is kept instead.
    """

    def __init__(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._sums: StateDict = {}
        self._maxima: StateDict = {}
        self.total_weight = 0.0
        self.num_updates = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one validated update in; `state` must match the manifest (checked upstream)."""
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"aggregation weight must be positive and finite, got {weight}")
        for name, spec in self._manifest.items():
            tensor = state[name]
            if spec.dtype.is_floating_point:
                acc_dtype = accumulator_dtype(spec.dtype)
                if name not in self._sums:
                    self._sums[name] = torch.zeros(spec.shape, dtype=acc_dtype)
                self._sums[name].add_(tensor.to(acc_dtype), alpha=weight)
            elif name not in self._maxima:
                self._maxima[name] = tensor.clone()
            else:
                torch.maximum(self._maxima[name], tensor, out=self._maxima[name])
        self.total_weight += weight
        self.num_updates += 1

    def result(self) -> StateDict:
        """The weighted average, in the manifest's dtypes; consumes the accumulator."""
        if self.num_updates == 0:
            raise ValueError("no updates were aggregated")
        out: StateDict = {}
        for name, spec in self._manifest.items():
            if spec.dtype.is_floating_point:
                acc = self._sums.pop(name)
                acc.div_(self.total_weight)
                out[name] = acc if acc.dtype == spec.dtype else acc.to(spec.dtype)
            else:
                out[name] = self._maxima.pop(name)
        return out
