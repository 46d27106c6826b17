"""Fixed-point encoding of weighted model updates into the ring Z_{2^k} for secure aggregation.

Masks only cancel in modular arithmetic, so each client turns its floating tensors into integers
modulo 2**k (k = 32 or 64) before masking, and the coordinator decodes the unmasked sum.

The vector a client encodes is [ (w / W) * x for every floating coordinate x ] + [ w / W ], with
w the client's aggregation weight and W the federation's weight cap, so the coordinator learns
only the weighted sum and the total weight, never one client's weight. Each entry is
round(value * 2**f) taken modulo 2**k.

Bounds (V = `value_bound`, the agreed bound on every |entry|, n = `num_clients`):
- no wrap-around: every client's entry lies in [-(V 2^f + 1/2), V 2^f + 1/2], so the signed sum
  of n of them lies in (-2^(k-1), 2^(k-1)) when n (V 2^f + 1/2) < 2^(k-1); `FixedPoint.for_sum`
  picks the largest f for which this holds, and also V 2^f <= 2^52 so that every scaled value
  is an integer float64 represents exactly.
- quantization: rounding moves each entry by at most 2^-(f+1), forming (w / W) * x in float64
  by at most V 2^-53, and converting the integer sum (up to n V 2^f) back to float64 by at most
  n V 2^-53, so every coordinate of the decoded sum is within e = n (2^-(f+1) + V 2^-52) of the
  exact sum (`sum_error_bound`). The decoded average S/T then
  differs from the plaintext weighted FedAvg by at most e (1 + V) / (T - e), T being the sum of
  the clients' w / W (`average_error_bound`).
Entries outside [-V, V] are refused rather than clipped: a silent clip or a wrap would corrupt
the model without anyone noticing. DP updates are clipped upstream (see dp.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from fedlink.common.tensors import Manifest, StateDict

RING_BITS = (32, 64)
_EXACT_FLOAT_BITS = 52


@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed-point numbers with `frac_bits` fractional bits in Z_{2^ring_bits}."""

    ring_bits: int
    frac_bits: int
    value_bound: float

    @classmethod
    def for_sum(cls, *, num_clients: int, value_bound: float, ring_bits: int = 64) -> FixedPoint:
        """The finest encoding whose sum over `num_clients` entries in [-V, V] cannot wrap."""
        if ring_bits not in RING_BITS:
            raise ValueError(f"ring_bits must be one of {RING_BITS}, got {ring_bits}")
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}")
        if not (math.isfinite(value_bound) and value_bound > 0):
            raise ValueError(f"value_bound must be positive and finite, got {value_bound}")
        limit = float(1 << (ring_bits - 1))
        # Largest f with V * 2^f <= 2^52 and n * (V * 2^f + 1/2) < 2^(k-1).
        frac_bits = math.floor(_EXACT_FLOAT_BITS - math.log2(value_bound))
        while frac_bits >= 0 and num_clients * (value_bound * 2.0**frac_bits + 0.5) >= limit:
            frac_bits -= 1
        if frac_bits < 0:
            raise ValueError(
                f"a {ring_bits}-bit ring cannot hold the sum of {num_clients} values bounded by "
                f"{value_bound}; use ring_bits=64 or a smaller value bound"
            )
        return cls(ring_bits=ring_bits, frac_bits=frac_bits, value_bound=value_bound)

    @property
    def dtype(self) -> np.dtype[np.unsignedinteger]:
        return np.dtype(np.uint32 if self.ring_bits == 32 else np.uint64)

    def encode(self, values: NDArray[np.floating]) -> NDArray[np.unsignedinteger]:
        """round(values * 2^f) modulo 2^k; refuses non-finite values or |value| > value_bound."""
        values = np.asarray(values, dtype=np.float64)
        if values.size:
            if not np.isfinite(values).all():
                raise ValueError("cannot encode non-finite values (NaN or infinity)")
            largest = float(np.abs(values).max())
            if largest > self.value_bound:
                raise ValueError(
                    f"a value of magnitude {largest:.6g} exceeds the secure-aggregation bound "
                    f"{self.value_bound:.6g}; clip the update or raise the federation's bound"
                )
        scaled: NDArray[np.int64] = np.rint(values * 2.0**self.frac_bits).astype(np.int64)
        # int64 -> uint32 keeps the low 32 bits: two's complement reduction modulo 2^32.
        ring: NDArray[np.unsignedinteger] = (
            scaled.view(np.uint64) if self.ring_bits == 64 else scaled.astype(np.uint32)
        )
        return ring

    def decode(self, ring: NDArray[np.unsignedinteger]) -> NDArray[np.float64]:
        """The signed values of ring elements (e.g. an unmasked sum), as float64."""
        signed = ring.astype(self.dtype, copy=False).view(
            np.int32 if self.ring_bits == 32 else np.int64
        )
        return signed.astype(np.float64) * 2.0**-self.frac_bits

    def sum_error_bound(self, num_clients: int) -> float:
        """Largest difference between a decoded sum of `num_clients` entries and the exact sum."""
        return num_clients * (2.0 ** -(self.frac_bits + 1) + self.value_bound * 2.0**-52)

    def average_error_bound(self, num_clients: int, weight_fraction_sum: float) -> float:
        """Largest difference between the decoded weighted average and plaintext FedAvg, for
        coordinates bounded by `value_bound` and a total weight of `weight_fraction_sum` * W."""
        error = self.sum_error_bound(num_clients)
        if weight_fraction_sum <= error:
            return math.inf
        return error * (1.0 + self.value_bound) / (weight_fraction_sum - error)


class UpdateLayout:
    """Where each floating tensor of the model sits in the flat vector, plus one weight slot.

    Integer and bool buffers (e.g. BatchNorm's num_batches_tracked) are counters, not weights:
    they are not part of the secure sum, and the aggregation keeps them by other means.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.entries = [
            (name, spec) for name, spec in manifest.items() if spec.dtype.is_floating_point
        ]
        self.length = sum(math.prod(spec.shape) for _, spec in self.entries) + 1

    def flatten(
        self, state: Mapping[str, torch.Tensor], weight_fraction: float
    ) -> NDArray[np.float64]:
        """[weight_fraction * x for x in the floating tensors] + [weight_fraction], as float64."""
        out = np.empty(self.length, dtype=np.float64)
        offset = 0
        for name, spec in self.entries:
            tensor = state[name]
            if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                raise ValueError(
                    f"tensor {name!r} does not match the model: {tensor.dtype} {tuple(tensor.shape)}"
                )
            size = tensor.numel()
            flat = tensor.detach().to("cpu", torch.float64).reshape(-1).numpy()
            np.multiply(flat, weight_fraction, out=out[offset : offset + size])
            offset += size
        out[-1] = weight_fraction
        return out

    def average(self, sums: NDArray[np.float64]) -> StateDict:
        """The weighted average from a decoded sum vector: every entry divided by the weight slot."""
        if sums.shape != (self.length,):
            raise ValueError(f"expected a vector of {self.length} entries, got shape {sums.shape}")
        total = float(sums[-1])
        if not total > 0:
            raise ValueError(f"the aggregated weight is {total}; nothing was aggregated")
        out: StateDict = {}
        offset = 0
        for name, spec in self.entries:
            size = math.prod(spec.shape)
            chunk = torch.from_numpy(sums[offset : offset + size] / total)
            out[name] = chunk.reshape(spec.shape).to(spec.dtype)
            offset += size
        return out


def encode_weighted_update(
    state: Mapping[str, torch.Tensor],
    weight: float,
    *,
    max_weight: float,
    layout: UpdateLayout,
    encoding: FixedPoint,
) -> NDArray[np.unsignedinteger]:
    """A client's ring vector for `state` with aggregation `weight` (<= the federation's cap)."""
    if not (math.isfinite(weight) and 0 < weight <= max_weight):
        raise ValueError(f"the aggregation weight must be in (0, {max_weight}], got {weight}")
    if encoding.value_bound < 1.0:
        raise ValueError("the value bound must be >= 1 so that the weight slot (<= 1) fits")
    return encoding.encode(layout.flatten(state, weight / max_weight))


def decode_weighted_average(
    ring_sum: NDArray[np.unsignedinteger], *, layout: UpdateLayout, encoding: FixedPoint
) -> StateDict:
    """Weighted FedAvg of the floating tensors from the unmasked sum of the clients' vectors."""
    return layout.average(encoding.decode(ring_sum))
