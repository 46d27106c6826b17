"""Operational signals for the coordinator, exported in Prometheus' text format.

Each engine owns its own registry (several coordinators can share a test process); the HTTP
endpoint is started only when `metrics_listen` is set. The metrics describe the federation's
progress and traffic, never model contents or data.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedlink.common.errors import ConfigError

log = logging.getLogger(__name__)


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rounds_completed = Counter(
            "fedlink_rounds_completed",
            "Training rounds completed (aggregated and checkpointed)",
            registry=self.registry,
        )
        self.current_round = Gauge(
            "fedlink_current_round", "The round in progress", registry=self.registry
        )
        self.clients_connected = Gauge(
            "fedlink_clients_connected",
            "Clients that showed a sign of life within the liveness timeout",
            registry=self.registry,
        )
        self.updates = Counter(
            "fedlink_updates",
            "Results received, by outcome (accepted, or the status code of the rejection)",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "fedlink_bytes_sent", "Payload bytes streamed to clients", registry=self.registry
        )
        self.bytes_received = Counter(
            "fedlink_bytes_received", "Payload bytes received from clients", registry=self.registry
        )
        self.round_duration = Histogram(
            "fedlink_round_duration_seconds",
            "Wall time of completed rounds",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=self.registry,
        )

        self.dp_epsilon = Gauge(
            "fedlink_dp_epsilon",
            "Differential privacy spent so far (epsilon at dp_delta); +Inf when DP is off",
            registry=self.registry,
        )

    def count_clients_with(self, live_clients: Callable[[], int]) -> None:
        """Read the live-client count when scraped, so it is never stale."""
        self.clients_connected.set_function(lambda: float(live_clients()))


class MetricsEndpoint:
    """The /metrics HTTP endpoint (plain HTTP: bind it to a private or loopback address)."""

    def __init__(self, listen: str, metrics: CoordinatorMetrics) -> None:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"metrics_listen must be host:port, got {listen!r}")
        self._server: WSGIServer
        self._thread: threading.Thread
        self._server, self._thread = start_http_server(
            int(port), addr=host.strip("[]"), registry=metrics.registry
        )
        self.port = self._server.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
