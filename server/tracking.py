"""Where a run's rounds go besides metrics.jsonl: TensorBoard event files and, optionally, MLflow.

Each tracker gets the run's settings once and every completed round's metrics row; what they
receive is what metrics.jsonl holds (aggregates only, never a client's update or its own metrics).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fedlink.common.errors import ConfigError
from fedlink.server.config import ServerConfig
from fedlink.server.phases import RoundRecord

log = logging.getLogger(__name__)

# Settings that name files on the coordinator's disk or say how it listens: not experiment
# parameters, and nothing a tracking server needs to hold.
_NOT_PARAMETERS = frozenset(
    {"cert", "key", "ca", "revocation_list", "listen", "metrics_listen", "address_file"}
)


class RunTracker(Protocol):
    def start(self, settings: Mapping[str, str]) -> None: ...

    def record(self, record: RoundRecord) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    """Scalars per round (step = round number) and the settings as a text table."""

    def __init__(self, directory: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(directory))

    def start(self, settings: Mapping[str, str]) -> None:
        rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
        self._writer.add_text("settings", f"| setting | value |\n|---|---|\n{rows}", 0)
        self._writer.flush()

    def record(self, record: RoundRecord) -> None:
        for name, value in round_metrics(record).items():
            self._writer.add_scalar(name, value, record.round)
        self._writer.flush()  # so a live `tensorboard --logdir` sees every round

    def close(self) -> None:
        self._writer.close()


class MlflowTracker:
    """One MLflow run per coordinator process: settings as parameters, rounds as metric steps.

    Rounds are recorded by the coordinator's checkpoint thread, and MLflow's active run is
    per thread (a call without one starts a new run): every call names this run's id."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        try:
            import mlflow
        except ImportError:
            raise ConfigError(
                "mlflow_tracking_uri is set but MLflow is not installed; install it with "
                "pip install 'fedlink[mlflow]'"
            ) from None
        self._mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        self._run_id = mlflow.start_run(run_name=run_name).info.run_id

    def start(self, settings: Mapping[str, str]) -> None:
        self._mlflow.log_params(dict(settings), run_id=self._run_id)

    def record(self, record: RoundRecord) -> None:
        self._mlflow.log_metrics(round_metrics(record), step=record.round, run_id=self._run_id)

    def close(self) -> None:
        self._mlflow.end_run()


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """The numeric, finite fields of a round's row (absent metrics are left out, not zero); the
    task's own metrics as test_<name> and federated_<name>, beside test_loss and the rest."""
    fields = dataclasses.asdict(record)
    for group in ("test", "federated"):
        for name, value in fields.pop(f"{group}_metrics").items():
            fields[f"{group}_{name}"] = value
    metrics: dict[str, float] = {}
    for name, value in fields.items():
        if name == "round" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            metrics[name] = float(value)
    return metrics


def run_settings(config: ServerConfig) -> dict[str, str]:
    """The run's settings as strings, for trackers (file paths and listen addresses left out)."""
    settings: dict[str, str] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in _NOT_PARAMETERS or value is None:
            continue
        if isinstance(value, Mapping):  # task_config: one parameter per setting
            settings.update({f"{field.name}.{k}": str(v) for k, v in value.items()})
            continue
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        settings[field.name] = str(value)
    return settings


def track_round(trackers: list[RunTracker], record: RoundRecord) -> None:
    """Hand a completed round to every tracker. A tracker that fails (an MLflow server that is
    down, a full disk under the event files) costs its own record, never the federation."""
    for tracker in trackers:
        try:
            tracker.record(record)
        except Exception as exc:  # any library's failure: the run goes on without it
            log.warning(
                "%s could not record round %d: %s", type(tracker).__name__, record.round, exc
            )


def close_trackers(trackers: list[RunTracker]) -> None:
    for tracker in trackers:
        try:
            tracker.close()
        except Exception as exc:  # as above: tracking never fails the run
            log.warning("%s could not close: %s", type(tracker).__name__, exc)


def open_trackers(config: ServerConfig) -> list[RunTracker]:
    """The trackers the configuration asks for, started with the run's settings."""
    trackers: list[RunTracker] = []
    if config.tensorboard:
        trackers.append(TensorBoardTracker(config.run_dir / "tensorboard"))
    if config.mlflow_tracking_uri:
        trackers.append(
            MlflowTracker(config.mlflow_tracking_uri, config.mlflow_experiment, config.run_dir.name)
        )
    settings = run_settings(config)
    for tracker in trackers:
        tracker.start(settings)
    return trackers
