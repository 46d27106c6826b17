import re
import socket
import struct
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sized
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from fedlink.common.errors import DataUnavailableError, TaskError
from fedlink.common.task_settings import NO_SETTINGS, check_task_settings
from fedlink.common.tasks import (
    BUILTIN_TASKS,
    REQUIRED_FUNCTIONS,
    cifar10,
    cifar10_resnet18,
    diabetes,
    digits,
    fashion_mnist,
    load_task,
    mnist,
)
from fedlink.common.tasks.base import (
    ClientData,
    DataRequest,
    DPSGDConfig,
    EvalResult,
    TensorExamples,
    TrainConfig,
)
from fedlink.common.tasks.contract import evaluate as contract_evaluate
from fedlink.common.tasks.contract import load_test_set, named_metrics, takes
from fedlink.common.tasks.training import (
    evaluate_classifier,
    make_optimizer,
    train_classifier,
    train_regressor,
)

CPU = torch.device("cpu")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "tasks.md"


def size(dataset: object) -> int:
    assert isinstance(dataset, Sized)
    return len(dataset)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- load_task ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILTIN_TASKS))
def test_load_task_finds_every_builtin(name: str) -> None:
    task = load_task(name)
    assert all(callable(getattr(task, fn)) for fn in REQUIRED_FUNCTIONS)


def test_load_task_accepts_a_dotted_module_path() -> None:
    assert load_task("fedlink.common.tasks.digits") is digits


def test_load_task_rejects_an_unknown_name() -> None:
    with pytest.raises(TaskError, match=r"neither a built-in \(digits, mnist"):
        load_task("no_such_package.no_such_task")


def test_load_task_names_missing_functions_and_points_to_docs() -> None:
    with pytest.raises(TaskError, match=r"does not define build_model, load_data.*docs/tasks\.md"):
        load_task("json")


def test_load_task_reports_a_missing_dependency_of_the_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_dep_task.py").write_text("import fedlink_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskError, match=r"failed to import.*fedlink_missing_dependency_xyz"):
        load_task("needs_dep_task")


def test_docs_example_task_loads_trains_and_evaluates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    (tmp_path / "doc_example_task.py").write_text(blocks[0])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "doc_example_task", raising=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 20)).astype(np.float32)
    np.savez(tmp_path / "features.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))

    task = load_task("doc_example_task")
    data = task.load_data(DataRequest(data_dir=tmp_path))
    model = task.build_model()
    assert task.train(model, data, TrainConfig(local_epochs=2), CPU).num_examples == 180
    assert data.test is not None
    assert task.evaluate(model, data.test, CPU).num_examples == 20
    assert task.load_test_data() is None


# --- models ------------------------------------------------------------------------------------


def test_digits_mlp_has_64_128_10_parameters() -> None:
    assert num_params(digits.build_model()) == 64 * 128 + 128 + 128 * 10 + 10


def test_mnist_cnn_is_the_fedavg_paper_model() -> None:
    model = mnist.build_model()
    assert num_params(model) == 1_663_370
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cifar10_small_cnn_forward() -> None:
    model = cifar10.build_model()
    assert num_params(model) == 62_006
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_cifar10_resnet18_has_about_11_2m_parameters() -> None:
    model = cifar10_resnet18.build_model()
    assert 11_100_000 < num_params(model) < 11_300_000
    assert model.eval()(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# --- digits data -------------------------------------------------------------------------------


def test_digits_data_shapes_and_scaling() -> None:
    data = digits.load_data(DataRequest())
    features, label = data.train[0]
    assert features.shape == (64,) and features.dtype == torch.float32
    assert label.dtype == torch.int64
    assert data.test is not None
    assert size(data.train) + size(data.test) == 1437  # the 80% training split
    test = digits.load_test_data()
    assert isinstance(test, TensorExamples) and len(test) == 360
    assert float(test.features.min()) >= 0.0 and float(test.features.max()) <= 1.0


def test_digits_partitions_are_disjoint_across_clients() -> None:
    seen: set[bytes] = set()
    total = 0
    for index in range(3):
        data = digits.load_data(DataRequest("dirichlet:0.5", index, 3, seed=4))
        for split in (data.train, data.test):
            assert isinstance(split, TensorExamples)
            seen.update(row.numpy().tobytes() for row in split.features)
            total += len(split)
    assert total == 1437 and len(seen) > 1400  # a few digits images are exact duplicates


def test_short_digits_training_beats_untrained_model() -> None:
    torch.manual_seed(0)
    model = digits.build_model()
    data = digits.load_data(DataRequest("iid", 0, 2, seed=0))
    test = digits.load_test_data()
    before = evaluate_classifier(model, test, CPU)
    result = train_classifier(
        model, data, TrainConfig(local_epochs=5, learning_rate=0.05, seed=1), CPU
    )
    after = digits.evaluate(model, test, CPU)
    assert result.num_examples == size(data.train)
    assert np.isfinite(result.loss)
    assert after.num_examples == 360
    assert after.accuracy > 0.85 and after.accuracy > before.accuracy + 0.5
    assert after.loss < before.loss


def test_training_is_reproducible_with_the_same_seeds() -> None:
    data = digits.load_data(DataRequest("iid", 1, 4, seed=0))
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        model = digits.build_model()
        digits.train(model, data, TrainConfig(seed=5), CPU)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_training_rejects_zero_epochs() -> None:
    data = digits.load_data(DataRequest())
    with pytest.raises(TaskError, match="local_epochs"):
        train_classifier(digits.build_model(), data, TrainConfig(local_epochs=0), CPU)


def test_digits_reads_a_site_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "digits.npz", x=rng.integers(0, 17, (50, 64)), y=rng.integers(0, 10, 50))
    data = digits.load_data(DataRequest(data_dir=tmp_path))
    assert data.test is not None
    assert size(data.train) + size(data.test) == 50
    assert float(data.train[0][0].max()) <= 1.0


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (None, "not found"),
        ({"x": np.zeros((5, 64))}, "has arrays"),
        ({"x": np.zeros((5, 63)), "y": np.zeros(5, dtype=np.int64)}, "x has shape"),
        ({"x": np.zeros((5, 64)), "y": np.zeros(5)}, "y has shape"),
        ({"x": np.full((5, 64), 255), "y": np.zeros(5, dtype=np.int64)}, "outside 0..16"),
        ({"x": np.zeros((5, 64)), "y": np.full(5, 10)}, "labels outside"),
        ({"x": np.array([{}], dtype=object), "y": np.zeros(1, dtype=np.int64)}, "cannot read"),
    ],
)
def test_digits_rejects_a_bad_site_file(
    tmp_path: Path, arrays: dict[str, np.ndarray] | None, message: str
) -> None:
    if arrays is not None:
        np.savez(tmp_path / "digits.npz", **arrays)  # type: ignore[arg-type]
    with pytest.raises(TaskError, match=message):
        digits.load_data(DataRequest(data_dir=tmp_path))


# --- torchvision data --------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_reads_a_local_copy_from_data_dir(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = mnist.load_data(DataRequest("classes:2", 1, 2, seed=0, data_dir=tmp_path))
    features, _ = data.train[0]
    assert features.shape == (1, 28, 28) and features.dtype == torch.float32
    assert isinstance(data.train, TensorExamples)
    assert len(set(data.train.labels.tolist())) == 2
    assert data.test is None  # 8 examples: too few to hold out a local test split
    assert mnist.build_model()(features.unsqueeze(0)).shape == (1, 10)
    # The coordinator's test set from its test_data_dir (the first contract's call still works).
    assert size(load_test_set(mnist, tmp_path)) == 10  # type: ignore[arg-type]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(("task", "name"), [(mnist, "MNIST"), (cifar10, "CIFAR-10")])
def test_download_failure_says_how_to_provide_the_data(
    tmp_path: Path, task: ModuleType, name: str
) -> None:
    with pytest.raises(DataUnavailableError) as caught:
        task.load_data(DataRequest(data_dir=tmp_path))
    message = str(caught.value)
    assert name in message and str(tmp_path) in message
    assert "no internet access" in message and "--data-dir" in message
    assert "Name or service not known" in message


def _offline_quickly(host: str = "ossci-datasets.s3.amazonaws.com") -> bool:
    """True if name lookup fails at once (offline sandbox); False if it works or may hang."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            socket.getaddrinfo(host, 443)
            outcome.append(False)
        except OSError:
            outcome.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout=2.0)
    return outcome == [True]


@pytest.mark.timeout(60)
def test_mnist_without_network_raises_data_unavailable(tmp_path: Path) -> None:
    if not _offline_quickly():
        pytest.skip("network reachable (or slow to fail): a real download would be attempted")
    with pytest.raises(DataUnavailableError, match="no internet access"):
        mnist.load_data(DataRequest(data_dir=tmp_path / "empty"))


# --- the contract beyond classification ------------------------------------------------------


def test_a_task_on_the_first_contract_is_called_as_it_was_written() -> None:
    # digits: load_test_data() without data_dir, evaluate = evaluate_classifier, whose fourth
    # parameter (batch_size) must never receive the task's settings.
    settings = check_task_settings({"batch_size": "oops"})
    assert not takes(digits.load_test_data, "data_dir")
    assert not takes(evaluate_classifier, "task_config")
    test = load_test_set(digits, None)
    assert test is not None
    result = contract_evaluate(digits, digits.build_model(), test, CPU, settings)
    assert result.num_examples == 360 and set(result.metrics) == {"loss", "accuracy"}
    with pytest.raises(TaskError, match="load_test_data\\(\\) takes no data_dir"):
        load_test_set(digits, Path("/srv/test"))


def test_a_task_on_the_second_contract_receives_data_dir_and_task_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "second_contract_task.py").write_text(
        "from fedlink.common.tasks.base import EvalResult\n"
        "def load_test_data(data_dir):\n"
        "    return [data_dir]\n"
        "def evaluate(model, dataset, device, task_config):\n"
        "    return EvalResult(len(dataset), 0.5, metrics={'scale': task_config['scale']})\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import second_contract_task as task

    test = load_test_set(task, tmp_path)  # type: ignore[arg-type]
    assert test == [tmp_path]
    settings = check_task_settings({"scale": 3})
    result = contract_evaluate(task, torch.nn.Linear(1, 1), test, CPU, settings)  # type: ignore[arg-type]
    assert result.metrics == {"loss": 0.5, "scale": 3.0}  # no accuracy: none was reported


@pytest.mark.parametrize(
    ("metrics", "message"),
    [
        ({"auroc": float("nan")}, "'auroc' is nan"),
        ({"bad name!": 1.0}, "metric name 'bad name!'"),
        ({"flag": True}, "not a number"),
        ({"loss": 1.0}, "reports 'loss' twice"),
        ({f"m{i}": 0.0 for i in range(70)}, "at most 64"),
    ],
)
def test_metrics_a_task_reports_are_checked_before_they_are_sent(
    metrics: dict[str, float], message: str
) -> None:
    with pytest.raises(TaskError, match=message):
        named_metrics(EvalResult(1, 0.5, metrics=metrics))


@pytest.mark.parametrize(("optimizer", "rate"), [("sgd", 0.05), ("adam", 0.005), ("adamw", 0.005)])
def test_the_coordinators_optimizer_and_weight_decay_are_used(optimizer: str, rate: float) -> None:
    torch.manual_seed(0)
    model = digits.build_model()
    data = digits.load_data(DataRequest("iid", 0, 2, seed=0))
    config = TrainConfig(
        local_epochs=3, learning_rate=rate, optimizer=optimizer, weight_decay=0.01, seed=1
    )
    built = make_optimizer(model, config)
    assert type(built).__name__.lower() == optimizer
    assert built.param_groups[0]["weight_decay"] == 0.01
    digits.train(model, data, config, CPU)
    assert digits.evaluate(model, digits.load_test_data(), CPU).accuracy > 0.8  # type: ignore[operator]


@pytest.mark.parametrize(("mu", "expected"), [(0.0, 0.64), (1.0, 0.66), (10.0, 0.84)])
def test_the_proximal_term_adds_mu_times_the_distance_from_the_global_model_to_the_gradient(
    mu: float, expected: float
) -> None:
    """FedProx's local objective F(w) + (mu / 2) ||w - w0||^2 by hand: one weight w0 = 1, one
    example (x = 1, y = 0), squared error, so the data's gradient is 2w; plain SGD, lr 0.1.
    Step 1 (w = w0, no pull yet): w1 = 1 - 0.1 * 2 = 0.8.
    Step 2: w2 = 0.8 - 0.1 * (2 * 0.8 + mu * (0.8 - 1)) = 0.64 + 0.02 mu."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    data = ClientData(train=TensorExamples(torch.ones(1, 1), torch.zeros(1)))
    config = TrainConfig(
        local_epochs=2, batch_size=1, learning_rate=0.1, momentum=0.0, proximal_mu=mu
    )
    train_regressor(model, data, config, CPU)
    assert model.weight.item() == pytest.approx(expected, abs=1e-6)


def test_the_proximal_term_applies_after_dpsgd_privatised_the_gradient() -> None:
    """Under DP-SGD a large mu keeps the model near the global one: the pull is added to the
    clipped, noised gradient right before each step (Opacus's optimizer wraps ours)."""
    pytest.importorskip("opacus")
    torch.manual_seed(0)
    data = digits.load_data(DataRequest("iid", 0, 4, seed=0))
    distances = {}
    for mu in (0.0, 1e3):
        model = digits.build_model()
        start = [p.detach().clone() for p in model.parameters()]
        config = TrainConfig(
            batch_size=8,
            learning_rate=0.001,
            momentum=0.0,
            proximal_mu=mu,
            dpsgd=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0),
        )
        digits.train(model, data, config, CPU)
        moved = zip(model.parameters(), start, strict=True)
        distances[mu] = sum(float((p.detach() - s).norm()) for p, s in moved)
    # lr * mu = 1: each step lands at w0 - lr * (privatised gradient), one step's noise away
    # from w0, where plain DP-SGD walks on for about 56 steps.
    assert distances[1e3] < distances[0.0] / 3


def test_diabetes_regression_learns_and_reports_mse_mae_and_r2() -> None:
    torch.manual_seed(0)
    model = diabetes.build_model()
    data = diabetes.load_data(DataRequest("iid", 0, 2, seed=0))
    test = diabetes.load_test_data()
    before = contract_evaluate(diabetes, model, test, CPU, NO_SETTINGS).metrics
    diabetes.train(model, data, TrainConfig(local_epochs=30, learning_rate=0.01, seed=1), CPU)
    after = contract_evaluate(diabetes, model, test, CPU, NO_SETTINGS).metrics
    assert {"loss", "mse", "mae", "r2"} <= set(after) and "accuracy" not in after
    assert after["mse"] == after["loss"] < before["mse"]
    assert after["r2"] > 0.2 > before["r2"]
    assert size(test) == 89  # 20% of the 442 patients
    assert size(data.train) + size(data.test) == 177  # type: ignore[arg-type]  # half the rest
    assert data.train[0][1].dtype == torch.float32  # targets stay floating


def test_diabetes_partitions_by_target_quartile_for_label_skew() -> None:
    parts = [diabetes.load_data(DataRequest("classes:1", i, 4, seed=0)) for i in range(4)]
    means = sorted(float(p.train.labels.mean()) for p in parts)  # type: ignore[attr-defined]
    assert means[0] < -0.5 and means[-1] > 0.5  # each client holds one quartile


fashion_installed = pytest.mark.skipif(
    not (fashion_mnist.SYSTEM_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; "
    ".ci/run installs it)",
)


@fashion_installed
def test_fashion_mnist_trains_one_round_on_the_real_data_of_the_debian_package() -> None:
    data = fashion_mnist.load_data(DataRequest("iid", 0, 100, seed=0))  # 600 of the 60,000
    test = fashion_mnist.load_test_data()
    assert size(test) == 10_000
    assert size(data.train) + size(data.test) == 600  # type: ignore[arg-type]
    subset = torch.utils.data.Subset(test, range(1000))
    torch.manual_seed(0)
    model = fashion_mnist.build_model()
    before = fashion_mnist.evaluate(model, subset, CPU)
    fashion_mnist.train(model, data, TrainConfig(learning_rate=0.05, seed=1), CPU)
    after = fashion_mnist.evaluate(model, subset, CPU)
    assert after.loss < before.loss
    assert after.accuracy > 0.3 and after.accuracy > before.accuracy + 0.1  # type: ignore[operator]


def test_fashion_mnist_reads_idx_files_from_data_dir_and_refuses_broken_ones(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    data = fashion_mnist.load_data(DataRequest(data_dir=tmp_path))
    assert size(data.train) + size(data.test) == 40  # type: ignore[arg-type]
    assert data.train[0][0].shape == (1, 28, 28)
    assert size(fashion_mnist.load_test_data(tmp_path)) == 10
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(
        b"\x00\x00\x08\x01\x00\x00\x00\x09" + b"\x00" * 9
    )
    with pytest.raises(TaskError, match="expected \\(N, 28, 28\\) images and N labels"):
        fashion_mnist.load_test_data(tmp_path)
    with pytest.raises(DataUnavailableError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist.load_data(DataRequest(data_dir=tmp_path / "empty"))


def test_a_data_set_is_read_once_per_process_until_its_files_change(tmp_path: Path) -> None:
    from fedlink.common.tasks.data_cache import cached_until_changed

    reads: list[bool] = []

    @cached_until_changed
    def load(data_dir: Path | None, *, train: bool) -> bytes:
        reads.append(train)
        assert data_dir is not None
        return (data_dir / "nested" / "data.bin").read_bytes()

    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "data.bin").write_bytes(b"one")
    first = load(tmp_path, train=True)
    assert load(tmp_path, train=True) is first and reads == [True]  # served from memory
    (tmp_path / "nested" / "data.bin").write_bytes(b"two!")  # repaired or replaced
    assert load(tmp_path, train=True) == b"two!" and reads == [True, True]
