"""Metrics that cannot be averaged over clients, as sufficient statistics the coordinator sums.

AUROC is the probability that a positive example scores above a negative one: a pairwise
quantity, so the mean of the clients' AUROCs is not the federation's AUROC. Each client
reports instead how many positive and how many negative examples fall in each of `bins` equal
score bins on [0, 1]; summed over clients, those counts give the AUROC of all the data with
scores rounded down to their bin (ties count one half, as in scikit-learn's roc_auc_score).
A task lists `AUROC_STATISTICS` in NOT_AVERAGED and computes `auroc` in aggregate_metrics:

    NOT_AVERAGED = (AUROC_STATISTICS,)

    def aggregate_metrics(results):
        return auroc_metric(results)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlink.common.errors import TaskError

AUROC_BINS = 20
# The statistics' names: auroc.pos.00 .. auroc.neg.19 (an fnmatch pattern for NOT_AVERAGED).
AUROC_STATISTICS = "auroc.*"


def auroc_statistics(
    scores: torch.Tensor, positive: torch.Tensor, bins: int = AUROC_BINS
) -> dict[str, float]:
    """Counts of positive and negative examples per score bin: `scores` in [0, 1] (a
    probability of the positive class), `positive` booleans of the same length."""
    if not 1 <= bins <= 30:  # two counts a bin, within a result's 64 metrics
        raise TaskError(f"AUROC needs 1 to 30 score bins, got {bins}")
    if scores.shape != positive.shape:
        raise TaskError(f"{scores.shape} scores but {positive.shape} labels")
    index = (scores.detach().float().clamp(0, 1) * bins).long().clamp(max=bins - 1).cpu()
    is_positive = positive.bool().cpu()
    statistics: dict[str, float] = {}
    for kind, chosen in (("pos", is_positive), ("neg", ~is_positive)):
        counts = torch.bincount(index[chosen], minlength=bins)
        statistics.update({f"auroc.{kind}.{i:02d}": float(c) for i, c in enumerate(counts)})
    return statistics


def auroc_metric(results: Sequence[tuple[int, Mapping[str, float]]]) -> dict[str, float]:
    """{"auroc": the AUROC of every client's examples together}, from their statistics; empty
    when no client reported any, or when only one class was seen (AUROC is undefined)."""
    positives: dict[int, float] = {}
    negatives: dict[int, float] = {}
    for _, metrics in results:
        for name, value in metrics.items():
            kind, _, index = name.removeprefix("auroc.").partition(".")
            if not name.startswith("auroc.") or not index.isdigit():
                continue
            if value < 0:  # counts: a negative one is a broken or hostile client
                raise TaskError(f"AUROC statistic {name} is negative ({value})")
            target = positives if kind == "pos" else negatives if kind == "neg" else None
            if target is not None:
                target[int(index)] = target.get(int(index), 0.0) + value
    total_positive, total_negative = sum(positives.values()), sum(negatives.values())
    if total_positive == 0 or total_negative == 0:
        return {}
    # For each bin: positives there beat every negative in a lower bin and tie with its own.
    wins, below = 0.0, 0.0
    for i in sorted(set(positives) | set(negatives)):
        negative_here = negatives.get(i, 0.0)
        wins += positives.get(i, 0.0) * (below + 0.5 * negative_here)
        below += negative_here
    return {"auroc": wins / (total_positive * total_negative)}
