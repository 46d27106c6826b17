"""The standard `grpc.health.v1` service, guarded so that no caller can hold the coordinator
with it.

`HealthStatuses` keeps the statuses and notifies Watch streams; `GuardedHealth` decides who may
ask and how much they may hold:

- `Check` answers any certificate the federation CA signed that is valid and not revoked, on
  or off the allow-list: it holds nothing once answered, and the container healthcheck
  (`fedlink health`, compose's `healthcheck` certificate) must keep working when an operator
  sets `allowed_clients`. It is rate-limited per identity like every other call.
- `Watch` (a stream that stays open) is refused (PERMISSION_DENIED) to identities off the
  allow-list or revoked, and bounded per identity and in total (RESOURCE_EXHAUSTED). An admitted
  stream holds no handler thread: it is answered through gRPC's non-blocking callback.
- Both run on a small pool of their own, so health answers do not wait for a free thread of the
  federation's pool (which long polls may fill).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from fedlink.common.errors import AccessDenied
from fedlink.server.access import AccessPolicy
from fedlink.server.config import ServerConfig
from fedlink.server.limits import CallSlot, ClientLimits

SERVICE = "grpc.health.v1.Health"
# Check and the start of a Watch take microseconds; a few threads answer thousands per second.
HEALTH_THREADS = 4


Status = int  # a health_pb2.HealthCheckResponse.ServingStatus value
Send = Callable[[health_pb2.HealthCheckResponse], Any]


class HealthStatuses:
    """The serving status of each service, and the Watch streams to tell when one changes.

    Replaces grpc_health's `HealthServicer`, which sends to its watchers while holding its lock
    and takes that lock in the callback gRPC runs, on its only polling thread, when a stream
    ends. A send waits for that polling thread, so a Watch starting while another was
    cancelled froze the whole coordinator (found by the health-stream fuzz family). Here the
    lock guards only the tables; every send happens outside it, and the end-of-stream callback
    only forgets the stream.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: dict[str, Status] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._watchers: dict[str, set[Send]] = {}

    def set(self, service: str, status: Status) -> None:
        with self._lock:
            self._statuses[service] = status
            watchers = list(self._watchers.get(service, ()))
        for send in watchers:
            send(health_pb2.HealthCheckResponse(status=status))

    def get(self, service: str) -> Status | None:
        with self._lock:
            return self._statuses.get(service)

    def watch(self, service: str, send: Send, context: grpc.ServicerContext) -> None:
        """Send `service`'s status now and on every change until the stream ends."""
        with self._lock:
            self._watchers.setdefault(service, set()).add(send)
            status = self._statuses.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        if not context.add_callback(lambda: self._forget(service, send)):
            self._forget(service, send)  # the stream has already ended
            return
        send(health_pb2.HealthCheckResponse(status=status))

    def _forget(self, service: str, send: Send) -> None:
        with self._lock:
            watchers = self._watchers.get(service)
            if watchers is not None:
                watchers.discard(send)
                if not watchers:
                    del self._watchers[service]


class GuardedHealth:
    """Who may use the health service, in front of the `statuses`."""

    def __init__(
        self, statuses: HealthStatuses, policy: AccessPolicy | None, config: ServerConfig
    ) -> None:
        self.statuses = statuses
        self._policy = policy  # None in --insecure mode: no certificates to check
        self._limits = ClientLimits(
            rate=config.rate_limit_per_second,
            burst=config.rate_limit_burst,
            max_calls=config.max_health_watches_per_client,
            max_total_calls=config.max_health_watches,
            settings=("max_health_watches_per_client", "max_health_watches"),
        )

    def check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self._admit(context, allow_list=False).release()
        status = self.statuses.get(request.service)
        if status is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    def watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Any,
    ) -> None:
        slot = self._admit(context, allow_list=True)
        # Released when the stream ends, whoever ends it (or now, if it already has).
        if not context.add_callback(slot.release):
            slot.release()
            return
        self.statuses.watch(request.service, send_response_callback, context)

    def _admit(self, context: grpc.ServicerContext, *, allow_list: bool) -> CallSlot:
        try:
            if self._policy is None:
                identity = context.peer()
            else:
                peer = self._policy.peer_of(context.auth_context())
                self._policy.check(peer, allow_list=allow_list)
                identity = peer.identity
            return self._limits.admit(identity)
        except AccessDenied as exc:
            context.abort(grpc.StatusCode[exc.code], str(exc))

    def handler(self, pool: futures.ThreadPoolExecutor) -> grpc.GenericRpcHandler:
        """The service's method handlers: both on `pool`, Watch non-blocking."""

        def check(request: Any, context: grpc.ServicerContext) -> Any:
            return self.check(request, context)

        def watch(request: Any, context: grpc.ServicerContext, respond: Any = None) -> None:
            self.watch(request, context, respond)

        # gRPC Python reads how to schedule a handler from attributes of the function.
        scheduled_check: Any = check
        scheduled_watch: Any = watch
        scheduled_check.experimental_thread_pool = pool
        scheduled_watch.experimental_thread_pool = pool
        scheduled_watch.experimental_non_blocking = True
        request = health_pb2.HealthCheckRequest
        reply = health_pb2.HealthCheckResponse
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    check, request.FromString, reply.SerializeToString
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    watch, request.FromString, reply.SerializeToString
                ),
            },
        )
