"""The standard `grpc.health.v1` service, guarded so that no caller can hold the coordinator
with it.

`HealthStatuses` keeps the statuses and notifies Watch streams; `GuardedHealth` decides who may
ask and how much they may hold:

- `Check` answers any certificate the federation CA signed that is valid and not revoked, on
  or off the allow-list: it holds nothing once answered, and the container healthcheck
  (`fedlink health`, compose's `healthcheck` certificate) must keep working when an operator
  sets `allowed_clients`. It is rate-limited per identity like every other call.
- `Watch` (a stream that stays open) is refused (PERMISSION_DENIED) to identities off the
  allow-list or revoked, and bounded per identity and in total (RESOURCE_EXHAUSTED).
- Both are coroutines on the coordinator's event loop like the federation's calls: a Watch
  stream waiting for the next change holds no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from fedlink.common.errors import AccessDenied
from fedlink.server.access import AccessPolicy
from fedlink.server.config import ServerConfig
from fedlink.server.limits import CallSlot, ClientLimits

SERVICE = "grpc.health.v1.Health"

Status = int  # a health_pb2.HealthCheckResponse.ServingStatus value
Context = grpc.aio.ServicerContext[Any, Any]


class HealthStatuses:
    """The serving status of each service, and the Watch streams to tell when one changes.

    `set` may be called from any thread (the round loop, a signal handler): it only records the
    status and wakes the watchers, which send from the event loop. A watcher that falls behind
    sends the latest status, never a queue of old ones, so a slow reader holds nothing.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: dict[str, Status] = {"": health_pb2.HealthCheckResponse.SERVING}
        self._watchers: dict[str, set[Callable[[], None]]] = {}

    def set(self, service: str, status: Status) -> None:
        with self._lock:
            self._statuses[service] = status
            watchers = list(self._watchers.get(service, ()))
        for wake in watchers:
            wake()

    def get(self, service: str) -> Status | None:
        with self._lock:
            return self._statuses.get(service)

    async def watch(self, service: str) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """`service`'s status now and after every change, until the stream ends."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(changed.set)

        with self._lock:
            self._watchers.setdefault(service, set()).add(wake)
        try:
            sent: Status | None = None
            while True:
                changed.clear()
                status = self.get(service)
                if status is None:
                    status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                if status != sent:
                    yield health_pb2.HealthCheckResponse(status=status)
                    sent = status
                await changed.wait()
        finally:
            with self._lock:
                watchers = self._watchers.get(service)
                if watchers is not None:
                    watchers.discard(wake)
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

    async def check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        (await self._admit(context, allow_list=False)).release()
        status = self.statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def watch(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        slot = await self._admit(context, allow_list=True)
        try:  # a cancelled stream's coroutine is cancelled: the slot is released either way
            async for response in self.statuses.watch(request.service):
                yield response
        finally:
            slot.release()

    async def _admit(self, context: Context, *, allow_list: bool) -> CallSlot:
        try:
            if self._policy is None:
                identity = context.peer()
            else:
                peer = self._policy.peer_of(context.auth_context())
                self._policy.check(peer, allow_list=allow_list)
                identity = peer.identity
            return self._limits.admit(identity)
        except AccessDenied as exc:
            await context.abort(grpc.StatusCode[exc.code], str(exc))

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, for a grpc.aio server."""
        request = health_pb2.HealthCheckRequest
        reply = health_pb2.HealthCheckResponse
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Check": grpc.unary_unary_rpc_method_handler(
                    self.check, request.FromString, reply.SerializeToString
                ),
                "Watch": grpc.unary_stream_rpc_method_handler(
                    self.watch, request.FromString, reply.SerializeToString
                ),
            },
        )
