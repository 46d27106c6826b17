"""The coordinator's gRPC server: grpc.aio on an event loop in a thread of its own.

Every call is a coroutine on that loop, so a waiting client (a long poll, a Watch stream, an
idle connection) costs a few KiB, never a thread; the coordinator's threads are this loop, the
`work` pool that hashes, spools and validates results (sized to the CPUs), and the round loop in
the main thread, which drives the engine and handles signals as before (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2

from fedlink.common.errors import ConfigError, UpdateRejected
from fedlink.common.pki import load_credentials
from fedlink.common.threads import usable_cpus
from fedlink.common.wire import MESSAGE_OVERHEAD
from fedlink.server.admin import AdminServicer, RunControl, add_admin_service
from fedlink.server.config import ServerConfig
from fedlink.server.health import GuardedHealth, HealthStatuses
from fedlink.server.rounds import RoundEngine
from fedlink.server.service import FederationServicer, RequestParsing, add_federation_service
from fedlink.server.status import RecentLogs

log = logging.getLogger(__name__)

SERVICE_NAME = "fedlink.v1.Federation"
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
    (handshaking or not) a new connection is closed at once.

    Calls that arrived but that the server has not yet taken up wait in core's pending queue:
    grpc.aio takes them one at a time, between the event loop's other work, so when thousands
    of clients call at once (a round opens, a join storm) the queue grows past core's default
    of 1,000, beyond which core cancels calls at random (the clients saw bare CANCELLED). The
    queue holds calls that `max_concurrent_rpcs` admits anyway: early refusal begins there,
    and core refuses every new call beyond twice that (RESOURCE_EXHAUSTED), which bounds what a
    flood of calls can make it hold. A call waits there at most a round's timeout (core's
    default, 30 s, cancelled uploads when 10,000 clients uploaded at once)."""
    return [
        ("grpc.server_handshake_timeout_ms", round(config.handshake_timeout_seconds * 1000)),
        ("grpc.max_connection_idle_ms", round(config.max_connection_idle_seconds * 1000)),
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.server.max_pending_requests", config.max_concurrent_rpcs),
        ("grpc.server.max_pending_requests_hard_limit", 2 * config.max_concurrent_rpcs),
        # How long a call may wait there before core cancels it: a saturated coordinator takes
        # up 10,000 uploads in a minute or two, and a client whose call is cancelled only makes
        # it again, at the same cost.
        ("grpc.server_max_unrequested_time_in_server", math.ceil(config.round_timeout_seconds)),
    ]


class LoopServer:
    """A grpc.aio server on an event loop of its own thread, controlled from any other thread."""

    def __init__(
        self,
        server: grpc.aio.Server,
        loop: asyncio.AbstractEventLoop,
        thread: threading.Thread,
        work: ThreadPoolExecutor,
    ) -> None:
        self._server = server
        self._loop = loop
        self._thread = thread
        self._work = work
        self._stopped: threading.Event | None = None
        self._lock = threading.Lock()

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving (calls in progress get `grace` seconds), then the loop and the workers.
        Returns an event set once all of it is done; calling again returns the same event."""
        with self._lock:
            if self._stopped is not None:
                return self._stopped
            stopped = self._stopped = threading.Event()

        async def shutdown() -> None:
            try:
                await self._server.stop(grace)
            finally:
                self._loop.stop()

        def finish() -> None:
            self._thread.join()
            self._loop.close()
            self._work.shutdown(wait=False, cancel_futures=True)
            stopped.set()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        threading.Thread(target=finish, name="transport-stop", daemon=True).start()
        return stopped


@dataclass
class Listening:
    server: LoopServer
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
    work = ThreadPoolExecutor(config.max_workers or usable_cpus(), thread_name_prefix="work")
    health = HealthStatuses()
    servicer = FederationServicer(engine, config, uuid.uuid4().hex, work)
    guarded = GuardedHealth(health, servicer.policy, config)
    if control is None:
        control = RunControl(stop=lambda reason: engine.request_stop(), exclude=excluder(engine))
    admin = AdminServicer(servicer.policy, engine.status, logs or RecentLogs(), control)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="transport", daemon=True)
    thread.start()
    try:
        server, port = asyncio.run_coroutine_threadsafe(
            _serve(config, servicer, guarded, admin), loop
        ).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        work.shutdown(wait=False)
        raise
    listening = Listening(LoopServer(server, loop, thread, work), port, health)
    listening.set_serving(True)
    return listening


def excluder(engine: RoundEngine) -> Callable[[str, str], None]:
    """Drop an excluded client from the round in progress and from sampling; the access policy
    refuses its calls from now on."""

    def exclude(identity: str, reason: str) -> None:
        engine.results.reject_participant(identity, UpdateRejected("PERMISSION_DENIED", reason))
        engine.board.leave(identity, reason)

    return exclude


async def _serve(
    config: ServerConfig,
    servicer: FederationServicer,
    guarded_health: GuardedHealth,
    admin: AdminServicer,
) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server with the federation, admin and health services, bound with mTLS
    (or, only when asked for explicitly, plaintext), and its port."""
    server = grpc.aio.server(
        # Beyond this many calls in progress, gRPC answers RESOURCE_EXHAUSTED itself.
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
    add_federation_service(servicer, server)
    add_admin_service(server, admin)
    server.add_generic_rpc_handlers((guarded_health.handler(),))
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
    await server.start()
    return server, port


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
