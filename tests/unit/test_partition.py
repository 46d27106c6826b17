import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedlink.common.errors import TaskError
from fedlink.common.partition import client_split, hold_out, parse_partition, partition
from fedlink.common.tasks.base import DataRequest

SPECS = ["iid", "dirichlet:0.5", "classes:2"]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.asarray(load_digits().target, dtype=np.int64)


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_gives_same_split(labels: np.ndarray, spec: str) -> None:
    first = partition(labels, spec, 5, seed=7)
    second = partition(labels, spec, 5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("spec", SPECS)
def test_different_seed_gives_different_split(labels: np.ndarray, spec: str) -> None:
    first = partition(labels, spec, 5, seed=1)
    second = partition(labels, spec, 5, seed=2)
    assert any(not np.array_equal(a, b) for a, b in zip(first, second, strict=True))


def test_split_is_identical_in_another_process(labels: np.ndarray, tmp_path: Path) -> None:
    np.save(tmp_path / "labels.npy", labels)
    code = (
        "import sys, numpy as np; from fedlink.common.partition import partition;"
        "y = np.load(sys.argv[1]);"
        "print([int(p.sum()) for p in partition(y, 'dirichlet:0.3', 4, 11)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "labels.npy")],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    here = [int(p.sum()) for p in partition(labels, "dirichlet:0.3", 4, 11)]
    assert out.stdout.strip() == str(here)


@pytest.mark.parametrize("spec", [*SPECS, "dirichlet:0.05", "classes:1", "classes:10"])
@pytest.mark.parametrize("num_clients", [1, 3, 10])
def test_clients_are_disjoint_and_non_empty(
    labels: np.ndarray, spec: str, num_clients: int
) -> None:
    parts = partition(labels, spec, num_clients, seed=0)
    assert len(parts) == num_clients
    assert all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    together = np.concatenate(parts)
    assert len(np.unique(together)) == len(together)
    assert together.min() >= 0 and together.max() < len(labels)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "classes:5"])
def test_every_example_is_assigned_when_classes_cover_the_data(
    labels: np.ndarray, spec: str
) -> None:
    parts = partition(labels, spec, 4, seed=0)  # classes:5 x 4 clients = 20 shards, 2 per class
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))


def test_iid_shares_are_equal_size(labels: np.ndarray) -> None:
    sizes = [len(p) for p in partition(labels, "iid", 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_classes_gives_each_client_exactly_k_classes_and_uses_every_class(
    labels: np.ndarray,
) -> None:
    parts = partition(labels, "classes:2", 5, seed=3)
    held = [set(labels[p].tolist()) for p in parts]
    assert all(len(classes) == 2 for classes in held)
    assert set().union(*held) == set(range(10))


@pytest.mark.parametrize(("num_clients", "k"), [(3, 3), (7, 3), (20, 2), (4, 1)])
def test_classes_gives_distinct_classes_for_uneven_shard_counts(
    labels: np.ndarray, num_clients: int, k: int
) -> None:
    parts = partition(labels, f"classes:{k}", num_clients, seed=0)
    assert all(len(set(labels[p].tolist())) == k for p in parts)


def test_small_dirichlet_alpha_skews_labels_more_than_large(labels: np.ndarray) -> None:
    def mean_dominant_share(spec: str) -> float:
        parts = partition(labels, spec, 5, seed=0)
        return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))

    skewed, even = mean_dominant_share("dirichlet:0.1"), mean_dominant_share("dirichlet:100")
    assert skewed > 0.3
    assert even < 0.15
    iid_share = mean_dominant_share("iid")
    assert abs(even - iid_share) < 0.05


@pytest.mark.parametrize(
    "spec",
    ["dirichlet:-1", "dirichlet:0", "dirichlet:abc", "dirichlet:nan", "dirichlet", "classes:0",
     "classes:1.5", "classes", "iid:3", "foo", ""],
)  # fmt: skip
def test_bad_specs_are_rejected_with_help(spec: str) -> None:
    with pytest.raises(TaskError, match=spec.split(":")[0] if spec else "unknown partition"):
        parse_partition(spec)


def test_more_clients_than_examples_is_an_error() -> None:
    with pytest.raises(TaskError, match="empty"):
        partition(np.arange(3), "iid", 4, seed=0)


def test_more_classes_per_client_than_exist_is_an_error(labels: np.ndarray) -> None:
    with pytest.raises(TaskError, match="only 10"):
        partition(labels, "classes:11", 2, seed=0)


def test_classes_with_too_few_examples_per_shard_is_an_error() -> None:
    with pytest.raises(TaskError, match="fewer clients"):
        partition(np.array([0, 0, 1, 1, 1, 1]), "classes:1", 6, seed=0)


def test_client_split_rejects_out_of_range_index(labels: np.ndarray) -> None:
    with pytest.raises(TaskError, match="out of range"):
        client_split(labels, DataRequest(partition_index=5, num_partitions=5))


def test_hold_out_sets_aside_a_tenth_or_nothing_when_tiny() -> None:
    train, test = hold_out(np.arange(100, dtype=np.int64), 0.1, seed=0)
    assert test is not None and len(test) == 10 and len(train) == 90
    assert not set(train.tolist()) & set(test.tolist())
    small, none = hold_out(np.arange(5, dtype=np.int64), 0.1, seed=0)
    assert none is None and len(small) == 5
