"""Byzantine-robust aggregation: norm clipping, coordinate-wise median, trimmed mean, Krum and
Multi-Krum, next to plain FedAvg so that clipping composes with every rule.

Unlike `StreamingFedAvg`, a median or a Krum score cannot be folded in one update at a time: these
rules take the round's accepted updates all at once, each a full local model (memory-mapped from
its spool file, already validated against the manifest). They read them tensor by tensor in
slices of at most `CHUNK_BUDGET // n` elements per update, so besides the result (one model) they
hold about `CHUNK_BUDGET` elements at a time, however large the model and however many clients.

Every rule works on deltas, `local - global`, and returns `global + combined delta`. The
coordinate-wise rules are translation-equivariant, so this is the same as combining the local
models; Krum's distances and the clipping norms are exact only on deltas.

Robust rules ignore the clients' sample counts: those are reported by the client, and an attacker
reports the federation's cap. Integer and bool tensors (e.g. BatchNorm's num_batches_tracked) are
counters, not weights: every rule takes `median_with_global` of them, as `StreamingFedAvg` does.
Results depend only on the updates and their order (the engine passes them sorted by identity).
"""

from __future__ import annotations

import logging
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from fedlink.common.errors import ConfigError
from fedlink.common.tensors import Manifest, StateDict
from fedlink.server.aggregation import StreamingFedAvg, accumulator_dtype, median_with_global

log = logging.getLogger(__name__)

# (aggregation weight, full local model) for each accepted update, in a deterministic order.
Update = tuple[float, Mapping[str, torch.Tensor]]

# Elements of all n updates held at once while combining one slice of one tensor
# (4M float32 = 16 MiB, plus what sorting or a pairwise difference needs beside it).
CHUNK_BUDGET = 1 << 22

_SPEC_HELP = (
    'use "fedavg", "median", "trimmed-mean,beta=<0..0.5>", "krum,f=<int>" or '
    '"multi-krum,f=<int>[,m=<int>]", optionally followed by ",clip=<max norm>" or ",clip=median"'
)


class RoundUpdates:
    """The round's updates as deltas from the global model, each scaled by a factor (1 unless
    clipped), read slice by slice."""

    def __init__(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        manifest: Manifest,
        scales: Sequence[float] | None = None,
    ) -> None:
        self.global_state = global_state
        self.updates = updates
        self.manifest = manifest
        self.scales = [1.0] * len(updates) if scales is None else list(scales)
        if len(self.scales) != len(updates):
            raise ValueError(f"{len(self.scales)} scale factors for {len(updates)} updates")

    def __len__(self) -> int:
        return len(self.updates)

    def rescaled(self, factors: Sequence[float]) -> RoundUpdates:
        scales = [s * f for s, f in zip(self.scales, factors, strict=True)]
        return RoundUpdates(self.global_state, self.updates, self.manifest, scales)

    def floating_names(self) -> list[str]:
        return [name for name, spec in self.manifest.items() if spec.dtype.is_floating_point]

    def slices(self, name: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(start, global slice, n x len deltas) for consecutive slices of tensor `name`, in its
        accumulator dtype (float32, or float64 for float64 tensors)."""
        spec = self.manifest[name]
        dtype = accumulator_dtype(spec.dtype)
        numel = math.prod(spec.shape)
        step = max(1, CHUNK_BUDGET // max(1, len(self.updates)))
        flat_global = self.global_state[name].reshape(-1)
        flat_locals = [state[name].reshape(-1) for _, state in self.updates]
        scales = torch.tensor(self.scales, dtype=dtype).unsqueeze(1)
        scaled = any(s != 1.0 for s in self.scales)
        for start in range(0, numel, step):
            end = min(numel, start + step)
            base = flat_global[start:end].to(dtype, copy=True)
            rows = torch.stack([flat[start:end].to(dtype) for flat in flat_locals])
            rows.sub_(base)
            if scaled:
                rows.mul_(scales)
            yield start, base, rows

    def norms(self) -> list[float]:
        """The L2 norm of each (scaled) delta over all floating-point tensors."""
        squares = torch.zeros(len(self.updates), dtype=torch.float64)
        for name in self.floating_names():
            for _, _, rows in self.slices(name):
                squares += rows.pow(2).sum(dim=1, dtype=torch.float64)
        return squares.sqrt().tolist()

    def state(self, index: int) -> Mapping[str, torch.Tensor]:
        """Update `index` as a full model: the local model itself, or global + scaled delta
        (one model's worth of memory) when it is scaled."""
        _, local = self.updates[index]
        scale = self.scales[index]
        if scale == 1.0:
            return local
        out: StateDict = {}
        for name, spec in self.manifest.items():
            if spec.dtype.is_floating_point:
                dtype = accumulator_dtype(spec.dtype)
                base = self.global_state[name].to(dtype, copy=True)
                delta = local[name].to(dtype) - base
                out[name] = base.add_(delta, alpha=scale).to(spec.dtype)
            else:
                out[name] = local[name]
        return out

    def combine(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> StateDict:
        """global + reduce(deltas) slice by slice for floating tensors, where `reduce` maps
        n x len deltas to len combined deltas; `median_with_global` for the others."""
        out: StateDict = {}
        for name, spec in self.manifest.items():
            if not spec.dtype.is_floating_point:
                values = [state[name] for _, state in self.updates]
                out[name] = median_with_global(self.global_state[name], values)
                continue
            result = torch.empty(math.prod(spec.shape), dtype=accumulator_dtype(spec.dtype))
            for start, base, rows in self.slices(name):
                result[start : start + len(base)] = base.add_(reduce(rows))
            out[name] = result.reshape(spec.shape).to(spec.dtype)
        return out


class AggregationRule(ABC):
    """Turns a round's accepted updates into the next global model."""

    name: str

    @property
    def min_updates(self) -> int:
        """The fewest updates this rule is defined for (check `min_results` against it)."""
        return 1

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Sequence[Update],
        manifest: Manifest,
    ) -> StateDict:
        """The new global model from `updates`, each a full local model matching `manifest`."""
        self.check(len(updates))
        for weight, _ in updates:
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"aggregation weight must be positive and finite, got {weight}")
        return self.combine(RoundUpdates(global_state, updates, manifest))

    def check(self, num_updates: int) -> None:
        """ConfigError when this rule is not defined for `num_updates` updates."""
        if num_updates < self.min_updates:
            raise ConfigError(
                f"{self.name} needs at least {self.min_updates} updates, got {num_updates}; "
                f"set min_results to at least {self.min_updates} or relax the rule's parameters"
            )

    @abstractmethod
    def combine(self, updates: RoundUpdates) -> StateDict:
        """The rule itself, on (possibly clipped) deltas."""


class FedAvg(AggregationRule):
    """Weighted mean by sample count: `StreamingFedAvg` over the (possibly clipped) updates.

    Costs one accumulator the size of the model, plus one model while a clipped update is
    materialized; O(n x model size) time. Assumes every client is honest: one update can move the
    result anywhere.
    """

    name = "fedavg"

    def combine(self, updates: RoundUpdates) -> StateDict:
        average = StreamingFedAvg(updates.manifest, updates.global_state)
        for index, (weight, _) in enumerate(updates.updates):
            average.add(updates.state(index), weight)
        return average.result()


class Median(AggregationRule):
    """Coordinate-wise median (Yin et al. 2018); the mean of the two middle values when n is even.

    O(n x model size x log n) time for the sort. Tolerates f < n/2 arbitrary updates in each
    coordinate, but with identical-looking colluders (ALIE) it can be pulled within the spread
    of the honest values.
    """

    name = "median"

    def combine(self, updates: RoundUpdates) -> StateDict:
        n = len(updates)

        def reduce(rows: torch.Tensor) -> torch.Tensor:
            ordered = rows.sort(dim=0).values
            if n % 2:
                return ordered[n // 2]
            return (ordered[n // 2 - 1] + ordered[n // 2]) / 2

        return updates.combine(reduce)


class TrimmedMean(AggregationRule):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the k = floor(beta x n)
    largest and k smallest values and average the rest.

    O(n x model size x log n) time. Tolerates up to k attackers; needs k >= 1 (otherwise it is an
    unweighted mean and tolerates none), i.e. n >= 1 / beta.
    """

    name = "trimmed-mean"

    def __init__(self, beta: float) -> None:
        if not (math.isfinite(beta) and 0 < beta < 0.5):
            raise ConfigError(f"trimmed-mean beta must be in (0, 0.5), got {beta}")
        self.beta = beta

    @property
    def min_updates(self) -> int:
        n = 1
        while math.floor(self.beta * n) < 1:
            n += 1
        return n

    def combine(self, updates: RoundUpdates) -> StateDict:
        n = len(updates)
        k = math.floor(self.beta * n)

        def reduce(rows: torch.Tensor) -> torch.Tensor:
            return rows.sort(dim=0).values[k : n - k].mean(dim=0)

        return updates.combine(reduce)


class MultiKrum(AggregationRule):
    """Multi-Krum (Blanchard et al. 2017): score each update by the summed squared distance to
    its n - f - 2 nearest neighbours and average the m best-scoring ones (unweighted). m = 1 is
    Krum, which returns the single best update; m unset means n - f.

    O(n^2 x model size) time for the pairwise distances, accumulated slice by slice into an n x n
    matrix, then one more pass to average the chosen updates. Assumes at most f attackers and
    needs n >= 2f + 3.
    """

    def __init__(self, f: int, m: int | None = None) -> None:
        if f < 0:
            raise ConfigError(f"krum f (the number of attackers tolerated) must be >= 0, got {f}")
        if m is not None and m < 1:
            raise ConfigError(
                f"multi-krum m (the number of updates averaged) must be >= 1, got {m}"
            )
        self.f = f
        self.m = m
        self.name = "krum" if m == 1 else "multi-krum"

    @property
    def min_updates(self) -> int:
        return max(2 * self.f + 3, (self.m or 1) + self.f)

    def select(self, updates: RoundUpdates) -> list[int]:
        """Indices of the chosen updates, best score first (ties go to the earlier update)."""
        n = len(updates)
        distances = torch.zeros(n, n, dtype=torch.float64)
        for name in updates.floating_names():
            for _, _, rows in updates.slices(name):
                for i in range(n - 1):
                    d = (rows[i + 1 :] - rows[i]).pow_(2).sum(dim=1, dtype=torch.float64)
                    distances[i, i + 1 :] += d
                    distances[i + 1 :, i] += d
        distances.fill_diagonal_(math.inf)
        neighbours = n - self.f - 2
        scores = distances.sort(dim=1).values[:, :neighbours].sum(dim=1)
        m = self.m if self.m is not None else n - self.f
        chosen: list[int] = torch.argsort(scores, stable=True)[:m].tolist()
        log.info("%s chose updates %s of %d", self.name, chosen, n)
        log.debug("%s scores: %s", self.name, scores.tolist())
        return chosen

    def combine(self, updates: RoundUpdates) -> StateDict:
        chosen = sorted(self.select(updates))  # a fixed summation order
        index = torch.tensor(chosen)
        return updates.combine(lambda rows: rows.index_select(0, index).mean(dim=0))


class NormClipping(AggregationRule):
    """Scale each delta down to at most `max_norm` (L2 over all floating tensors), then apply
    `inner`. `max_norm=None` clips to the median norm of the round's updates, which needs no
    tuning and holds while fewer than half the clients attack.

    One extra pass over the updates to compute the norms; no extra memory beyond `inner`'s.
    Bounds how far one update can move the mean; does not stop many small poisoned updates.
    """

    def __init__(self, inner: AggregationRule, max_norm: float | None = None) -> None:
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ConfigError(f"clip max norm must be positive and finite, got {max_norm}")
        self.inner = inner
        self.max_norm = max_norm
        self.name = f"clipped {inner.name}"

    @property
    def min_updates(self) -> int:
        return self.inner.min_updates

    def combine(self, updates: RoundUpdates) -> StateDict:
        norms = updates.norms()
        bound = self.max_norm if self.max_norm is not None else statistics.median(norms)
        factors = [bound / norm if norm > bound else 1.0 for norm in norms]
        clipped = sum(factor < 1.0 for factor in factors)
        log.info("clipped %d of %d updates to norm %.4g", clipped, len(norms), bound)
        return self.inner.combine(updates.rescaled(factors))


def parse_rule(spec: str) -> AggregationRule:
    """A rule from a spec such as "median", "krum,f=2" or "multi-krum,f=3,m=5,clip=median"."""
    name, *params = (part.strip() for part in spec.strip().split(","))
    values: dict[str, str] = {}
    for param in params:
        key, sep, value = param.partition("=")
        if not sep or key in values:
            raise ConfigError(
                f"bad aggregation {spec!r}: {param!r} is not a new key=value; {_SPEC_HELP}"
            )
        values[key] = value
    clip = values.pop("clip", None)
    allowed: dict[str, set[str]] = {
        "fedavg": set(),
        "median": set(),
        "trimmed-mean": {"beta"},
        "krum": {"f"},
        "multi-krum": {"f", "m"},
    }
    if name not in allowed:
        raise ConfigError(f"unknown aggregation {name!r}; {_SPEC_HELP}")
    unknown = set(values) - allowed[name]
    missing = allowed[name] - set(values) - {"m"}
    if unknown or missing:
        raise ConfigError(
            f"bad aggregation {spec!r}: {name} takes {sorted(allowed[name])}; {_SPEC_HELP}"
        )
    try:
        rule: AggregationRule
        if name == "fedavg":
            rule = FedAvg()
        elif name == "median":
            rule = Median()
        elif name == "trimmed-mean":
            rule = TrimmedMean(float(values["beta"]))
        elif name == "krum":
            rule = MultiKrum(int(values["f"]), m=1)
        else:
            m = values.get("m")
            rule = MultiKrum(int(values["f"]), None if m is None else int(m))
        if clip is not None:
            rule = NormClipping(rule, None if clip == "median" else float(clip))
    except ValueError as exc:
        raise ConfigError(f"bad aggregation {spec!r}: {exc}; {_SPEC_HELP}") from None
    return rule
