"""`fedlink server`: start the coordinator, run the federation, write the results, exit."""

from __future__ import annotations

import dataclasses
import logging
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
import torch
from grpc_health.v1 import health_pb2

from fedlink.common.errors import ConfigError, UpdateRejected
from fedlink.common.pki import load_credentials
from fedlink.common.storage import publish_file
from fedlink.common.tasks import load_task
from fedlink.common.tasks.base import TaskModule
from fedlink.common.tensors import StateDict
from fedlink.common.threads import size_torch_threads
from fedlink.common.wire import MESSAGE_OVERHEAD
from fedlink.server.admin import AdminServicer, RunControl, add_admin_service
from fedlink.server.checkpoints import CheckpointStore, check_resumable, run_identity
from fedlink.server.config import ServerConfig
from fedlink.server.dashboard import Dashboard
from fedlink.server.health import HEALTH_THREADS, GuardedHealth, HealthStatuses
from fedlink.server.memory import start_memory_trim
from fedlink.server.monitoring import MetricsEndpoint
from fedlink.server.report import MetricsLog, plot_metrics, read_metrics, table_header, table_row
from fedlink.server.rounds import Evaluator, RoundEngine, RoundRecord, RunSummary
from fedlink.server.service import FederationServicer, RequestParsing
from fedlink.server.state_lock import lock_state_dir
from fedlink.server.status import RecentLogs, load_rounds
from fedlink.server.tracking import close_trackers, open_trackers, track_round
from fedlink.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "fedlink.v1.Federation"
# Exit status when the coordinator stopped because it could not write its state (EX_TEMPFAIL):
# nothing was lost, and a restart on the same state_dir resumes once the disk is usable.
EXIT_STORAGE_FAILURE = 75
TRANSPORT_OPTIONS = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Bandwidth-delay probing lets each stream's receive window grow to many MB, so concurrent
    # uploads buffered tens of MB each inside gRPC (measured: +42 MiB per ResNet-18 client vs
    # +17 MiB without it, at the same round time). Memory must not grow with the clients.
    ("grpc.http2.bdp_probe", 0),
    # Without probing the window would stay at 64 KiB: one 64 KiB burst per round trip, about
    # 3 MB/s per upload at 20 ms RTT. A fixed 4 MiB window bounds the per-stream buffer and
    # still fills long links (measured on loopback, 100M x 10: +18 MiB per client).
    ("grpc.http2.lookahead_bytes", 4 << 20),
]


def connection_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC core's limits on connections, before any call (docs/security.md): a handshake that
    does not finish is cut off, an idle connection is closed, and beyond `max_connections`
    (handshaking or not) a new connection is closed at once."""
    return [
        ("grpc.server_handshake_timeout_ms", round(config.handshake_timeout_seconds * 1000)),
        ("grpc.max_connection_idle_ms", round(config.max_connection_idle_seconds * 1000)),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
    ]


@dataclass
class Listening:
    server: grpc.Server
    port: int
    health: HealthStatuses

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)


def start_server(
    config: ServerConfig,
    engine: RoundEngine,
    *,
    control: RunControl | None = None,
    logs: RecentLogs | None = None,
) -> Listening:
    """Bind and start the gRPC server for `engine`; health reports SERVING once it listens.
    `control` is what the Admin service's actions do (default: StopRun ends the run as if it
    were complete), `logs` the lines it shows."""
    health_servicer = HealthStatuses()
    servicer = FederationServicer(engine, config, federation_id=uuid.uuid4().hex)
    guarded = GuardedHealth(health_servicer, servicer.policy, config)
    if control is None:
        control = RunControl(stop=lambda reason: engine.request_stop(), exclude=_excluder(engine))
    admin = AdminServicer(servicer.policy, engine.status, logs or RecentLogs(), control)
    server, port = _build_server(config, servicer, guarded, admin)
    server.start()
    listening = Listening(server, port, health_servicer)
    listening.set_serving(True)
    return listening


def _excluder(engine: RoundEngine) -> Callable[[str, str], None]:
    """Drop an excluded client from the round in progress and from sampling; the access policy
    refuses its calls from now on."""

    def exclude(identity: str, reason: str) -> None:
        engine.reject_participant(identity, UpdateRejected("PERMISSION_DENIED", reason))
        engine.leave(identity, reason)

    return exclude


def _build_server(
    config: ServerConfig,
    servicer: FederationServicer,
    guarded_health: GuardedHealth,
    admin: AdminServicer,
) -> tuple[grpc.Server, int]:
    """A gRPC server with the federation, admin and health services, bound with mTLS (or, only
    when asked for explicitly, plaintext). Returns the server and the bound port."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
        # Beyond this many calls in progress or queued, gRPC answers RESOURCE_EXHAUSTED itself.
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        interceptors=[RequestParsing()],
        options=[
            ("grpc.max_receive_message_length", config.chunk_size + MESSAGE_OVERHEAD),
            ("grpc.max_send_message_length", config.chunk_size + MESSAGE_OVERHEAD),
            # gRPC sets SO_REUSEPORT by default: a second coordinator on the same port would
            # start silently and the kernel would split the clients between the two.
            ("grpc.so_reuseport", 0),
            *TRANSPORT_OPTIONS,
            *connection_options(config),
        ],
    )
    pb_grpc.add_FederationServicer_to_server(servicer, server)
    add_admin_service(server, admin)
    health_pool = futures.ThreadPoolExecutor(HEALTH_THREADS, thread_name_prefix="health")
    server.add_generic_rpc_handlers((guarded_health.handler(health_pool),))
    if config.insecure:
        log.warning(
            "INSECURE MODE: no TLS, clients are not authenticated and traffic is readable by "
            "anyone on the network. Use this for local development only."
        )
        port = _bind(lambda: server.add_insecure_port(config.listen), config.listen)
    else:
        assert config.cert and config.key and config.ca
        creds = load_credentials(config.cert, config.key, config.ca, role="server")
        server_credentials = grpc.ssl_server_credentials(
            [(creds.key_pem, creds.cert_pem)],
            root_certificates=creds.ca_pem,
            require_client_auth=True,
        )
        port = _bind(
            lambda: server.add_secure_port(config.listen, server_credentials), config.listen
        )
    return server, port


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


def _bind(add_port: Callable[[], int], listen: str) -> int:
    """Bind the listening port, or raise ConfigError saying why a coordinator cannot start."""
    try:
        port = add_port()
    except RuntimeError:  # gRPC's "Failed to bind to address"
        port = 0
    if port == 0:
        raise ConfigError(
            f"cannot listen on {listen}: the address is in use (another coordinator?) or not "
            "an address of this machine; stop the other process or choose another --listen"
        )
    return port


def run_server(config: ServerConfig) -> int:
    for directory, flag in ((config.state_dir, "--state-dir"), (config.run_dir, "--run-dir")):
        _check_writable(directory, flag)
    lock = lock_state_dir(config.state_dir)
    try:
        return _coordinate(config)
    finally:
        lock.release()


def _coordinate(config: ServerConfig) -> int:
    threads = size_torch_threads(config.threads)
    log.debug("torch computes with %d CPU threads", threads)
    task = load_task(config.task)
    checkpoint = CheckpointStore(config.state_dir, keep=config.keep_checkpoints).latest()
    if checkpoint is not None:
        check_resumable(checkpoint, run_identity(config))
    torch.manual_seed(config.seed)
    model = task.build_model()
    initial_state = model.state_dict()
    evaluate_centrally = _central_evaluator(task, model)
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
    )
    del initial_state
    if checkpoint is not None:
        load_rounds(engine.status, read_metrics(metrics.path))
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
            config, engine, control=RunControl(stop_run, _excluder(engine)), logs=logs
        )
        return _serve(config, engine, listening, stop, stop_run, endpoint, dashboard, metrics)
    finally:
        logging.getLogger().removeHandler(logs)
        close_trackers(trackers)


def _serve(
    config: ServerConfig,
    engine: RoundEngine,
    listening: Listening,
    stop: threading.Event,
    stop_run: Callable[[str], None],
    endpoint: MetricsEndpoint | None,
    dashboard: Dashboard | None,
    metrics: MetricsLog,
) -> int:
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
    previous = _install_signal_handlers(stop_run)
    try:
        print(table_header(), flush=True)
        summary = engine.run(stop)
    finally:
        listening.set_serving(False)
        _restore_signal_handlers(previous)
    engine.status.set_state(_final_state(summary))

    if summary.storage_failure is not None:
        listening.server.stop(grace=2.0).wait()
        if endpoint is not None:
            endpoint.close()
        if dashboard is not None:
            dashboard.close()
        return EXIT_STORAGE_FAILURE
    publish_file(summary.final_model, config.run_dir / "final_model.safetensors")
    records = read_metrics(metrics.path)
    if records:
        plot_metrics(records, config.run_dir / "accuracy.png")
    engine.wait_for_stop_delivery(grace_seconds=15.0)
    listening.server.stop(grace=2.0).wait()
    if endpoint is not None:
        endpoint.close()
    if dashboard is not None:
        dashboard.close()
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


def _central_evaluator(task: TaskModule, model: torch.nn.Module) -> Evaluator | None:
    """Evaluation of each new global model on the task's centralized test set, if it has one."""
    test_set = task.load_test_data()
    if test_set is None:
        return None
    device = torch.device("cpu")

    def evaluate(state: StateDict) -> tuple[float, float]:
        model.load_state_dict(state)
        result = task.evaluate(model, test_set, device)
        return result.loss, result.accuracy

    return evaluate


def _final_state(summary: RunSummary) -> str:
    if summary.stopped_by_signal:
        return "stopped"
    if summary.completed or summary.budget_spent:
        return "finished"
    return "failed"


def _install_signal_handlers(stop_run: Callable[[str], None]) -> dict[int, object]:
    def handle(signum: int, frame: FrameType | None) -> None:
        stop_run(f"received {signal.Signals(signum).name}")

    previous: dict[int, object] = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handle)
    return previous


def _restore_signal_handlers(previous: dict[int, object]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # type: ignore[arg-type]
