"""Evaluation metrics combined over clients (server/metrics.py), and the statistics that let a
task report metrics a mean cannot give (common/tasks/metrics.py)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score, roc_auc_score

from fedlink.common.errors import TaskError
from fedlink.common.tasks import diabetes, digits
from fedlink.common.tasks.metrics import AUROC_STATISTICS, auroc_metric, auroc_statistics
from fedlink.common.tasks.training import evaluate_regressor
from fedlink.server.metrics import MetricAggregator, other_metrics

CPU = torch.device("cpu")


def test_every_metric_is_averaged_weighted_by_examples() -> None:
    combined = MetricAggregator()([(1, {"loss": 1.0, "mae": 4.0}), (3, {"loss": 3.0})])
    assert combined == {"loss": 2.5, "mae": 4.0}  # mae: only the client that reported it


def test_not_averaged_metrics_are_left_to_the_tasks_own_aggregation() -> None:
    def total_count(results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
        return {"count": sum(m["stat.count"] for _, m in results)}

    aggregate = MetricAggregator(not_averaged=("stat.*",), custom=total_count)
    combined = aggregate([(10, {"loss": 1.0, "stat.count": 2.0}), (30, {"stat.count": 5.0})])
    assert combined == {"loss": 1.0, "count": 7.0}


def test_a_failing_task_aggregation_costs_its_metrics_not_the_round(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
        return {"auroc": float("nan")}

    with caplog.at_level(logging.WARNING):
        combined = MetricAggregator(custom=broken)([(1, {"loss": 0.5})])
    assert combined == {"loss": 0.5}
    assert "aggregate_metrics failed" in caplog.text and "not a finite number" in caplog.text


def test_a_task_declaring_its_aggregation_wrongly_is_told_so() -> None:
    class Task:
        NOT_AVERAGED = "r2"  # a string, not a collection of names

    with pytest.raises(TaskError, match="NOT_AVERAGED must be a collection"):
        MetricAggregator.for_task(Task())  # type: ignore[arg-type]


def test_clients_naming_many_different_metrics_cannot_grow_the_results_without_bound() -> None:
    results = [(1, {f"c{client}.m{i}": 1.0 for i in range(60)}) for client in range(10)]
    results.append((100, {"loss": 0.5}))
    combined = MetricAggregator()(results)
    assert len(combined) == 64 and combined["loss"] == 0.5  # the most widely reported kept


def test_loss_and_accuracy_are_kept_out_of_the_other_metrics() -> None:
    assert other_metrics({"loss": 1.0, "accuracy": 0.5, "r2": 0.3}) == {"r2": 0.3}


def test_federated_r2_of_the_diabetes_task_is_the_r2_of_all_clients_data() -> None:
    torch.manual_seed(0)
    model = diabetes.build_model()
    test = diabetes.load_test_data()
    x, y = test.features, test.labels  # type: ignore[attr-defined]
    parts = [slice(0, 20), slice(20, 50), slice(50, len(y))]
    results = []
    for part in parts:
        result = evaluate_regressor(model, torch.utils.data.TensorDataset(x[part], y[part]), CPU)
        results.append((result.num_examples, {"mse": result.loss, **result.metrics}))
    combined = MetricAggregator.for_task(diabetes)(results)
    with torch.no_grad():
        predictions = model(x).numpy()
    assert combined["r2"] == pytest.approx(r2_score(y.numpy(), predictions), abs=1e-5)
    assert combined["mse"] == pytest.approx(float(np.mean((predictions - y.numpy()) ** 2)))
    # The moments R² is computed from are statistics, not results.
    assert "target_mean" not in combined and "target_square_mean" not in combined
    # Averaging each client's own R² would give another, wrong number.
    assert combined["r2"] != pytest.approx(np.mean([m["r2"] for _, m in results]), abs=1e-3)


def test_auroc_from_summed_statistics_is_scikit_learns_auroc_of_the_binned_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(300, generator=generator)
    positive = torch.rand(300, generator=generator) < scores  # informative scores
    clients = [slice(0, 50), slice(50, 180), slice(180, 300)]
    results = [(s.stop - s.start, auroc_statistics(scores[s], positive[s])) for s in clients]
    binned = np.minimum(np.floor(scores.numpy() * 20), 19)
    expected = roc_auc_score(positive.numpy(), binned)
    assert auroc_metric(results)["auroc"] == pytest.approx(expected)
    assert MetricAggregator(not_averaged=(AUROC_STATISTICS,), custom=auroc_metric)(results) == {
        "auroc": pytest.approx(expected)
    }


def test_auroc_is_left_out_when_only_one_class_was_seen_and_refuses_negative_counts() -> None:
    statistics = auroc_statistics(torch.tensor([0.2, 0.9]), torch.tensor([True, True]))
    assert auroc_metric([(2, statistics)]) == {}
    with pytest.raises(TaskError, match="negative"):
        auroc_metric([(1, {"auroc.pos.00": -5.0})])


def test_the_builtin_classification_tasks_report_loss_and_accuracy_as_before() -> None:
    result = digits.evaluate(digits.build_model(), digits.load_test_data(), CPU)
    assert result.accuracy is not None and result.metrics == {}
