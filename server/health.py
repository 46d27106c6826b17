"""The standard `grpc.health.v1` service, guarded so that no caller can hold the coordinator
with it.

gRPC's `HealthServicer` keeps the statuses and notifies Watch streams; this module decides who
may ask and how much they may hold:

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

from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from fedlink.common.errors import AccessDenied
from fedlink.server.access import AccessPolicy, verified_peer
from fedlink.server.config import ServerConfig
from fedlink.server.limits import CallSlot, ClientLimits

SERVICE = "grpc.health.v1.Health"
# Check and the start of a Watch take microseconds; a few threads answer thousands per second.
HEALTH_THREADS = 4


class GuardedHealth:
    """Who may use the health service, in front of gRPC's `HealthServicer` (`statuses`)."""

    def __init__(
        self, statuses: health.HealthServicer, policy: AccessPolicy | None, config: ServerConfig
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
        reply: health_pb2.HealthCheckResponse = self.statuses.Check(request, context)
        return reply

    def watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.ServicerContext,
        send_response_callback: Any,
    ) -> None:
        slot = self._admit(context, allow_list=True)
        # Released when the stream ends, whoever ends it.
        context.add_callback(slot.release)
        self.statuses.Watch(request, context, send_response_callback)

    def _admit(self, context: grpc.ServicerContext, *, allow_list: bool) -> CallSlot:
        try:
            if self._policy is None:
                identity = context.peer()
            else:
                peer = verified_peer(context.auth_context())
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
