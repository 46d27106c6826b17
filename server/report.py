"""What a run leaves behind for people: metrics.jsonl, a round table, a plot of its metrics."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlink.server.phases import RoundRecord

TABLE_COLUMNS = (
    "round",
    "clients",
    "accuracy",
    "loss",
    "fed acc",
    "seconds",
    "MB moved",
    "epsilon",
    "metrics",  # the task's other metrics (test set; federated when there is none)
)


class MetricsLog:
    """Appends one JSON object per round to `metrics.jsonl` (flushed, so it can be tailed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """A new run: an empty log."""
        self.path.write_text("")

    def resume(self, last_round: int, last_record: Mapping[str, Any]) -> None:
        """A resumed run: keep rows up to the checkpointed round, which is restored from the
        checkpoint itself when the coordinator died before writing its row."""
        kept: list[dict[str, Any]] = []
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a row cut short by the crash
            if (
                isinstance(row, dict)
                and isinstance(row.get("round"), int)
                and row["round"] < last_round
            ):
                kept.append(row)
        kept.append(dict(last_record))
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: RoundRecord) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dataclasses.asdict(record)) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def table_header() -> str:
    return "  ".join(f"{c:>9}" for c in TABLE_COLUMNS)


def table_row(record: Mapping[str, Any]) -> str:
    def number(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    moved = (record["bytes_down"] + record["bytes_up"]) / 1e6
    cells = (
        str(record["round"]),
        f"{record['clients_accepted']}/{record['clients_sampled']}",
        number(record["test_accuracy"], ".4f"),
        number(record["test_loss"], ".4f"),
        number(record["federated_accuracy"], ".4f"),
        f"{record['seconds']:.2f}",
        f"{moved:.2f}",
        number(record.get("epsilon"), ".3f"),  # DP only; rows written before DP existed lack it
    )
    return "  ".join([*(f"{c:>9}" for c in cells), _other_metrics(record)]).rstrip()


def _other_metrics(record: Mapping[str, Any]) -> str:
    """`name=value` for each of the task's other metrics; centralized ones, else federated."""
    metrics = record.get("test_metrics") or record.get("federated_metrics") or {}
    return " ".join(f"{name}={value:.4g}" for name, value in metrics.items())


def format_table(records: Iterable[Mapping[str, Any]]) -> str:
    return "\n".join([table_header(), *(table_row(r) for r in records)])


# The plot's panels: what each shows and which metrics.jsonl fields it draws, as (field, label).
PLOT_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("accuracy", (("test_accuracy", "centralized test"), ("federated_accuracy", "federated eval"))),
    (
        "loss",
        (
            ("train_loss", "training (clients)"),
            ("test_loss", "centralized test"),
            ("federated_loss", "federated eval"),
        ),
    ),
    ("privacy spent (epsilon)", (("epsilon", "DP-FedAvg"), ("dpsgd_epsilon", "DP-SGD, largest"))),
)


# Panels for the task's own metrics, in the order first reported; the rest stay in metrics.jsonl.
MAX_TASK_PANELS = 12


def metric_panels(
    records: Sequence[Mapping[str, Any]],
) -> list[tuple[str, list[tuple[str, list[tuple[int, float]]]]]]:
    """(title, [(label, [(round, value)])]) for each panel of the plot: accuracy, loss and
    privacy, then one per metric of the task's own (test_metrics, federated_metrics). A panel
    whose metrics the run never reported is left out."""
    panels: list[tuple[str, tuple[tuple[str, str], ...]]] = list(PLOT_PANELS)
    names = dict.fromkeys(
        name
        for r in records
        for group in ("test_metrics", "federated_metrics")
        for name in r.get(group) or {}
    )
    for name in list(names)[:MAX_TASK_PANELS]:
        panels.append(
            (
                name,
                (
                    (f"test_metrics.{name}", "centralized test"),
                    (f"federated_metrics.{name}", "federated eval"),
                ),
            )
        )
    drawn = []
    for title, series in panels:
        lines = []
        for key, label in series:
            points = [(r["round"], value) for r in records if (value := _field(r, key)) is not None]
            if points:
                lines.append((label, points))
        if lines:
            drawn.append((title, lines))
    return drawn


def _field(record: Mapping[str, Any], key: str) -> float | None:
    """`record[key]`, or `record[group][name]` for a key `group.name`."""
    group, _, name = key.partition(".")
    value = (record.get(group) or {}).get(name) if name else record.get(key)
    return value if isinstance(value, int | float) else None


def plot_metrics(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Every metric the run reported as a PNG: a panel per kind (accuracy, loss, privacy) and
    one per metric of the task's own, four panels to a row."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in containers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = metric_panels(records)
    if not panels:
        return
    columns = min(len(panels), 4)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, lines) in zip(axes.flat, panels, strict=False):
        for label, points in lines:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3, label=label)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(title)
        if title == "accuracy":
            ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle("fedlink: global model per round")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
