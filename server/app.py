"""`fedlink server`: start the coordinator, run the federation, write the results, exit."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import torch

from fedlink.common.errors import ConfigError
from fedlink.common.storage import publish_file
from fedlink.common.tasks import load_task
from fedlink.common.tasks.base import TaskModule
from fedlink.common.tasks.contract import evaluate, exchanged_tensors, load_test_set
from fedlink.common.tensors import StateDict
from fedlink.common.threads import size_torch_threads
from fedlink.server.admin import RunControl
from fedlink.server.checkpoints import CheckpointStore, check_resumable, run_identity
from fedlink.server.client_rows import ClientRows
from fedlink.server.config import ServerConfig
from fedlink.server.dashboard import Dashboard
from fedlink.server.memory import start_memory_trim
from fedlink.server.metrics import MetricAggregator
from fedlink.server.monitoring import MetricsEndpoint
from fedlink.server.phases import RoundRecord, RunSummary
from fedlink.server.report import MetricsLog, plot_metrics, read_metrics, table_header, table_row
from fedlink.server.rounds import Evaluator, RoundEngine
from fedlink.server.state_lock import lock_state_dir
from fedlink.server.status import RecentLogs, load_rounds
from fedlink.server.tracking import RunTracker, close_trackers, open_trackers, track_round
from fedlink.server.transport import Listening, excluder, start_server

log = logging.getLogger(__name__)

# Exit status when the coordinator stopped because it could not write its state (EX_TEMPFAIL):
# nothing was lost, and a restart on the same state_dir resumes once the disk is usable.
EXIT_STORAGE_FAILURE = 75


def _check_writable(directory: Path, flag: str) -> None:
    """Create `directory` and prove a file can be written there, before any work: a mistake in
    the path is one clear line at start-up, not a traceback from deep inside the first round."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise ConfigError(
            f"{flag} {directory} is not usable: {exc.strerror or exc}; choose a directory this "
            f"user can create and write (pass {flag} or set it in the config file)"
        ) from None


def run_server(config: ServerConfig) -> int:
    with locked_run_dirs(config):
        return _coordinate(config)


@contextlib.contextmanager
def locked_run_dirs(config: ServerConfig) -> Iterator[None]:
    """The run and state directories, checked writable, the state directory locked for this
    process (one coordinator, or simulation, per state directory)."""
    for directory, flag in ((config.state_dir, "--state-dir"), (config.run_dir, "--run-dir")):
        _check_writable(directory, flag)
    lock = lock_state_dir(config.state_dir)
    try:
        yield
    finally:
        lock.release()


@dataclasses.dataclass
class CoordinatorRun:
    """A run's round engine with what records its rounds: metrics.jsonl, the trackers, the
    status, the table on stdout. `fedlink server` serves it over gRPC; `fedlink simulate`
    drives it in-process."""

    config: ServerConfig  # as given, with what the task declares (the tensors it exchanges)
    engine: RoundEngine
    metrics: MetricsLog
    trackers: list[RunTracker]

    @classmethod
    def open(cls, config: ServerConfig) -> CoordinatorRun:
        threads = size_torch_threads(config.threads)
        log.debug("torch computes with %d CPU threads", threads)
        task = load_task(config.task)
        if not config.exchanged_tensors and exchanged_tensors(task):
            # What the task exchanges (its adapters), unless the configuration names others.
            config = dataclasses.replace(config, exchanged_tensors=exchanged_tensors(task))
        checkpoint = CheckpointStore(config.state_dir, keep=config.keep_checkpoints).latest()
        if checkpoint is not None:
            check_resumable(checkpoint, run_identity(config))
        torch.manual_seed(config.seed)
        model = task.build_model()
        initial_state = model.state_dict()
        aggregate_evaluation = MetricAggregator.for_task(task)
        evaluate_centrally = _central_evaluator(config, task, model, aggregate_evaluation)
        if evaluate_centrally is None:
            del model  # nothing to evaluate on: hold only the serialized global model
        config.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = MetricsLog(config.run_dir / "metrics.jsonl")
        if checkpoint is None:
            metrics.start()
        else:
            metrics.resume(checkpoint.round, checkpoint.record)

        trackers = open_trackers(config)

        def on_round(record: RoundRecord) -> None:
            metrics.append(record)
            track_round(trackers, record)
            engine.status.round_completed(dataclasses.asdict(record))
            print(table_row(dataclasses.asdict(record)), flush=True)

        engine = RoundEngine(
            config,
            initial_state,
            evaluate_centrally=evaluate_centrally,
            on_round=on_round,
            resume_from=checkpoint,
            aggregate_evaluation=aggregate_evaluation,
            client_rows=ClientRows.for_run(config, resuming=checkpoint is not None),
        )
        del initial_state
        if checkpoint is not None:
            load_rounds(engine.status, read_metrics(metrics.path))
        return cls(config, engine, metrics, trackers)

    def close(self) -> None:
        close_trackers(self.trackers)

    def publish(self, config: ServerConfig, summary: RunSummary) -> None:
        """The final model and the plot into the run directory."""
        publish_file(summary.final_model, config.run_dir / "final_model.safetensors")
        records = read_metrics(self.metrics.path)
        if records:
            plot_metrics(records, config.run_dir / "accuracy.png")


def _coordinate(config: ServerConfig) -> int:
    run = CoordinatorRun.open(config)
    try:
        return _serve_run(run.config, run)
    finally:
        run.close()


def _serve_run(config: ServerConfig, run: CoordinatorRun) -> int:
    engine = run.engine
    endpoint = (
        MetricsEndpoint(config.metrics_listen, engine.metrics) if config.metrics_listen else None
    )
    logs = RecentLogs()
    logging.getLogger().addHandler(logs)
    stop = threading.Event()
    listening: Listening | None = None

    def stop_run(reason: str) -> None:
        """What SIGTERM, SIGINT and the Admin service's StopRun do."""
        log.info("%s: stopping after cleaning up", reason)
        engine.status.set_state("stopping")
        stop.set()
        if listening is not None:
            listening.set_serving(False)

    try:
        # The dashboard first: a token file it refuses stops the start before any client joins.
        dashboard = Dashboard.start(config, engine.status, logs)
        listening = start_server(
            config, engine, control=RunControl(stop_run, excluder(engine)), logs=logs
        )
        return _serve(config, run, listening, stop, stop_run, endpoint, dashboard)
    finally:
        logging.getLogger().removeHandler(logs)


def _serve(
    config: ServerConfig,
    run: CoordinatorRun,
    listening: Listening,
    stop: threading.Event,
    stop_run: Callable[[str], None],
    endpoint: MetricsEndpoint | None,
    dashboard: Dashboard | None,
) -> int:
    engine = run.engine
    port = listening.port
    host = config.listen.rsplit(":", 1)[0]
    log.info(
        "coordinator listening on %s:%d (task %s, %d rounds, %s)",
        host,
        port,
        config.task,
        config.num_rounds,
        "INSECURE" if config.insecure else "mTLS",
    )
    if config.address_file is not None:
        config.address_file.write_text(f"{host}:{port}\n")

    start_memory_trim(stop)
    previous = install_signal_handlers(stop_run)
    try:
        print(table_header(), flush=True)
        summary = engine.run(stop)
    finally:
        listening.set_serving(False)
        restore_signal_handlers(previous)
    engine.status.set_state(_final_state(summary))

    if summary.storage_failure is not None:
        listening.server.stop(grace=2.0).wait()
        if endpoint is not None:
            endpoint.close()
        if dashboard is not None:
            dashboard.close()
        return EXIT_STORAGE_FAILURE
    run.publish(config, summary)
    _tell_clients_finished(engine, config.finished_grace_seconds)
    listening.server.stop(grace=2.0).wait()
    if endpoint is not None:
        endpoint.close()
    if dashboard is not None:
        dashboard.close()
    return exit_status(config, summary)


def exit_status(config: ServerConfig, summary: RunSummary) -> int:
    """How a run that wrote its results ended, logged, as the process's exit status."""
    log.info("wrote %s", config.run_dir)
    if summary.stopped_by_signal:
        log.info(
            "stopped by signal after round %d; start again on %s to resume",
            summary.rounds_completed,
            config.state_dir,
        )
        return 0
    if summary.budget_spent:
        log.info(
            "federation finished early: privacy budget dp_max_epsilon=%g spent after round %d "
            "of %d",
            config.dp_max_epsilon,
            summary.rounds_completed,
            config.num_rounds,
        )
        return 0
    if not summary.completed:
        log.error(
            "run failed: %d of %d rounds completed", summary.rounds_completed, config.num_rounds
        )
        return 1
    log.info("federation finished: %d rounds", summary.rounds_completed)
    return 0


def _tell_clients_finished(engine: RoundEngine, grace_seconds: float) -> None:
    """Stay up answering "finished" (see RoundEngine.wait_for_stop_delivery); SIGTERM or
    SIGINT ends the wait early, so `docker compose down` is never held up by it."""
    done = threading.Event()
    previous = install_signal_handlers(lambda reason: done.set())
    try:
        engine.board.wait_for_stop_delivery(grace_seconds, done)
    finally:
        restore_signal_handlers(previous)


def _central_evaluator(
    config: ServerConfig,
    task: TaskModule,
    model: torch.nn.Module,
    aggregate: MetricAggregator,
) -> Evaluator | None:
    """Evaluation of each new global model on the task's centralized test set, if it has one;
    its metrics are combined like one client's, so they mean what the federated ones mean."""
    test_set = load_test_set(task, config.test_data_dir)
    if test_set is None:
        return None
    device = torch.device("cpu")
    # A partial model's global state holds the travelling tensors; the rest stay the model's own.
    strict = not config.tensor_selection().partial

    def evaluate_centrally(state: StateDict) -> dict[str, float]:
        model.load_state_dict(state, strict=strict)
        result = evaluate(task, model, test_set, device, config.task_config)
        return aggregate([(result.num_examples, result.metrics)])

    return evaluate_centrally


def _final_state(summary: RunSummary) -> str:
    if summary.stopped_by_signal:
        return "stopped"
    if summary.completed or summary.budget_spent:
        return "finished"
    return "failed"


def install_signal_handlers(stop_run: Callable[[str], None]) -> dict[int, object]:
    def handle(signum: int, frame: FrameType | None) -> None:
        stop_run(f"received {signal.Signals(signum).name}")

    previous: dict[int, object] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handle)
    return previous


def restore_signal_handlers(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]
