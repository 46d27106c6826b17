"""How the coordinator combines evaluation metrics over clients.

Each metric a client reports is averaged over the clients, weighted by the examples each
evaluated: right for means (loss, accuracy, MSE), and for sufficient statistics reported as
means (mean target, mean squared target: R² follows from them exactly). A metric that is not a
mean (AUROC, a median) cannot be averaged: the task lists it, or the statistics it is computed
from, in `NOT_AVERAGED` (names or fnmatch patterns) and computes it in
`aggregate_metrics(results)` from every client's (num_examples, metrics). The coordinator's own
test set goes through the same aggregation, as a single result, so both columns mean the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from fnmatch import fnmatchcase

from fedlink.common.errors import TaskError
from fedlink.common.tasks.base import TaskModule
from fedlink.common.tasks.contract import MAX_METRICS, check_metric_values

log = logging.getLogger(__name__)

ClientMetrics = tuple[int, Mapping[str, float]]
CustomAggregation = Callable[[Sequence[ClientMetrics]], Mapping[str, float]]


class MetricAggregator:
    """Evaluation results of many clients -> the federation's metrics, by name."""

    def __init__(
        self, not_averaged: Collection[str] = (), custom: CustomAggregation | None = None
    ) -> None:
        self._not_averaged = tuple(not_averaged)
        self._custom = custom

    @classmethod
    def for_task(cls, task: TaskModule) -> MetricAggregator:
        """The aggregation `task` asks for (NOT_AVERAGED, aggregate_metrics; both optional)."""
        patterns = getattr(task, "NOT_AVERAGED", ())
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise TaskError(
                f"the task's NOT_AVERAGED must be a collection of metric names or patterns, "
                f"got {patterns!r}"
            )
        custom = getattr(task, "aggregate_metrics", None)
        if custom is not None and not callable(custom):
            raise TaskError("the task's aggregate_metrics must be a function of the results")
        return cls(patterns, custom)

    def __call__(self, results: Sequence[ClientMetrics]) -> dict[str, float]:
        """Weighted means of the averageable metrics, then the task's own (which win)."""
        totals: dict[str, tuple[float, int]] = {}
        for num_examples, metrics in results:
            for name, value in metrics.items():
                if self._averaged(name):
                    total, count = totals.get(name, (0.0, 0))
                    totals[name] = (total + num_examples * value, count + num_examples)
        if len(totals) > MAX_METRICS:
            # Each result is bounded, but clients could each name different metrics: keep those
            # that cover the most examples, so metrics.jsonl and the plot stay bounded.
            kept = sorted(totals, key=lambda name: (-totals[name][1], name))[:MAX_METRICS]
            log.warning(
                "clients reported %d different metrics; keeping the %d most widely reported",
                len(totals),
                MAX_METRICS,
            )
            totals = {name: totals[name] for name in kept}
        combined = {name: total / count for name, (total, count) in totals.items() if count > 0}
        if self._custom is not None and results:
            combined.update(self._run_custom(results))
        return combined

    def _averaged(self, name: str) -> bool:
        return not any(fnmatchcase(name, pattern) for pattern in self._not_averaged)

    def _run_custom(self, results: Sequence[ClientMetrics]) -> dict[str, float]:
        # The statistics come from clients: a hostile or buggy one can make the task's own
        # aggregation fail. That costs the task's metrics for this round, never the run.
        assert self._custom is not None
        try:
            return check_metric_values(self._custom(results), "aggregate_metrics()")
        except Exception as exc:
            log.warning("the task's aggregate_metrics failed, its metrics are left out: %s", exc)
            return {}


# RoundRecord has its own fields for these (the table, the plot and older readers use them).
_RECORD_FIELDS = ("loss", "accuracy")


def other_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics besides loss and accuracy, for RoundRecord's *_metrics."""
    return {name: value for name, value in metrics.items() if name not in _RECORD_FIELDS}
