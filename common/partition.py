"""Deterministic, seeded splits of a labelled data set across simulated clients.

A partition spec is a short string, as a user types it on the command line:

    iid              every client gets a uniformly random, equally sized share
    dirichlet:<a>    per class, shares drawn from Dirichlet(a); small a means strong label skew
    classes:<k>      every client holds examples of exactly k distinct classes ("shards")

Each partitioner takes the label array, the number of clients and a seed, and returns one sorted
int64 index array per client. The same arguments give the same split in every process (NumPy's
PCG64 generator is seeded explicitly), no example goes to two clients, and no client is empty.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from fedlink.common.errors import TaskError

if TYPE_CHECKING:  # keep this module free of torch at run time
    from fedlink.common.tasks.base import DataRequest

IndexArray = NDArray[np.int64]
Partitioner = Callable[[NDArray[np.integer], int, int], list[IndexArray]]

_SPEC_HELP = 'use "iid", "dirichlet:<alpha>" (alpha > 0) or "classes:<k>" (k >= 1)'

# A Dirichlet draw can leave a client with almost nothing; redraw until every client holds at
# least this many examples (or as many as an even split allows), as in Hsu et al. 2019.
_DIRICHLET_MIN_SIZE = 10
_DIRICHLET_MAX_TRIES = 1000


def parse_partition(spec: str) -> Partitioner:
    """Turn a spec such as "dirichlet:0.5" into a partitioner; TaskError if it is malformed."""
    kind, sep, arg = spec.strip().partition(":")
    if kind == "iid" and not sep:
        return iid
    if kind == "dirichlet" and sep:
        try:
            alpha = float(arg)
        except ValueError:
            alpha = math.nan
        if not (math.isfinite(alpha) and alpha > 0):
            raise TaskError(
                f"bad partition {spec!r}: alpha must be a positive number, e.g. dirichlet:0.5"
            )
        return functools.partial(dirichlet, alpha=alpha)
    if kind == "classes" and sep:
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k < 1:
            raise TaskError(f"bad partition {spec!r}: k must be an integer >= 1, e.g. classes:2")
        return functools.partial(classes, k=k)
    raise TaskError(f"unknown partition {spec!r}: {_SPEC_HELP}")


def partition(
    labels: NDArray[np.integer], spec: str, num_clients: int, seed: int
) -> list[IndexArray]:
    """Split `labels` into `num_clients` index arrays according to `spec`."""
    return parse_partition(spec)(labels, num_clients, seed)


def client_indices(
    labels: NDArray[np.integer], spec: str, num_clients: int, index: int, seed: int
) -> IndexArray:
    """The indices of client `index` (0-based) in the `spec` split of `labels`."""
    if not 0 <= index < num_clients:
        raise TaskError(
            f"partition index {index} is out of range for {num_clients} partitions "
            f"(valid: 0..{num_clients - 1})"
        )
    return partition(labels, spec, num_clients, seed)[index]


def client_split(
    labels: NDArray[np.integer], request: DataRequest, holdout: float = 0.1
) -> tuple[IndexArray, IndexArray | None]:
    """This client's (train, local test) indices: its part of the `request.partition` split of
    `labels`, with `holdout` of it set aside for local evaluation (None when the part is tiny)."""
    indices = client_indices(
        labels, request.partition, request.num_partitions, request.partition_index, request.seed
    )
    return hold_out(indices, holdout, request.seed)


def hold_out(
    indices: IndexArray, fraction: float, seed: int, min_size: int = 20
) -> tuple[IndexArray, IndexArray | None]:
    """Split `indices` into (train, held out `fraction`), or (indices, None) if fewer than
    `min_size`: a client's local evaluation set is only worth having when it is not tiny."""
    if len(indices) < min_size:
        return indices, None
    n_out = max(1, round(len(indices) * fraction))
    shuffled = np.random.default_rng(seed).permutation(indices)
    return np.sort(shuffled[n_out:]), np.sort(shuffled[:n_out])


def iid(labels: NDArray[np.integer], num_clients: int, seed: int) -> list[IndexArray]:
    """Shuffle all examples and deal them out in equal shares (sizes differ by at most one)."""
    labels = _check(labels, num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return _finish(np.array_split(order, num_clients))


def dirichlet(
    labels: NDArray[np.integer], num_clients: int, seed: int, *, alpha: float
) -> list[IndexArray]:
    """Per class, split its examples among clients in proportions drawn from Dirichlet(alpha).

    A client that already holds more than an even share gets no more of the next class, and the
    whole draw is repeated until every client holds at least a minimum number of examples.
    """
    labels = _check(labels, num_clients)
    rng = np.random.default_rng(seed)
    n = len(labels)
    min_size = max(1, min(_DIRICHLET_MIN_SIZE, n // num_clients))
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_MAX_TRIES):
        shares: list[list[IndexArray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            proportions = np.where(sizes < n / num_clients, proportions, 0.0)
            total = proportions.sum()
            if total == 0:  # every client is full: spread this class evenly instead
                proportions, total = np.ones(num_clients), float(num_clients)
            cuts = (np.cumsum(proportions / total) * len(members)).astype(np.int64)[:-1]
            for client, part in enumerate(np.split(members, cuts)):
                shares[client].append(part)
                sizes[client] += len(part)
        if sizes.min() >= min_size:
            return _finish([np.concatenate(parts) for parts in shares])
    raise TaskError(
        f"dirichlet:{alpha} could not give each of {num_clients} clients at least {min_size} "
        f"examples in {_DIRICHLET_MAX_TRIES} draws; use a larger alpha or fewer clients"
    )


def classes(
    labels: NDArray[np.integer], num_clients: int, seed: int, *, k: int
) -> list[IndexArray]:
    """Give every client k shards of k distinct classes (McMahan et al. 2017, "pathological
    non-IID").

    The data is sorted by label and cut into num_clients * k shards. Unlike a plain cut of the
    sorted array, a shard never straddles two classes: each class is cut into its own shards (the
    shard count spread as evenly as possible over the classes), so a client holds exactly k
    classes. With fewer shards than classes, a seeded random subset of classes is used.
    """
    labels = _check(labels, num_clients)
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    if k > len(present):
        raise TaskError(
            f"classes:{k} asks for {k} classes per client but the data has only {len(present)}"
        )
    num_shards = num_clients * k
    # Shards per class: an even spread, the remainder going to randomly chosen classes.
    class_order = rng.permutation(present)
    per_class = np.zeros(len(class_order), dtype=np.int64)
    per_class[:] = num_shards // len(class_order)
    per_class[: num_shards % len(class_order)] += 1
    shards: list[IndexArray] = []
    for label, count in zip(class_order, per_class, strict=True):
        if count == 0:
            continue
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < count:
            raise TaskError(
                f"classes:{k} needs {count} shards of class {label} but it has only "
                f"{len(members)} examples; use fewer clients or a smaller k"
            )
        shards.extend(np.array_split(members, count))
    # Shards are grouped by class, and no class has more than num_clients shards (k <= classes),
    # so dealing them round-robin never hands a client two shards of the same class.
    dealt = [np.concatenate(shards[c::num_clients]) for c in range(num_clients)]
    return _finish([dealt[c] for c in rng.permutation(num_clients)])


def _check(labels: NDArray[np.integer], num_clients: int) -> NDArray[np.integer]:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TaskError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if num_clients < 1:
        raise TaskError(f"number of partitions must be at least 1, got {num_clients}")
    if len(labels) < num_clients:
        raise TaskError(
            f"cannot split {len(labels)} examples among {num_clients} clients "
            "without leaving some empty"
        )
    return labels


def _finish(parts: list[NDArray[np.integer]]) -> list[IndexArray]:
    """Sort each client's indices and check that none is empty."""
    result = [np.sort(part).astype(np.int64) for part in parts]
    empty = [i for i, part in enumerate(result) if len(part) == 0]
    if empty:
        raise TaskError(f"partition left clients {empty} without data; use fewer clients")
    return result
