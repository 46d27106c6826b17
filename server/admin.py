"""The Admin service: the operator's view of the run, and two actions (stop, exclude a client).

Only admin certificates (`fedlink certs issue --admin`) may call it; client and server
certificates are refused (PERMISSION_DENIED once the certificate is known to be the CA's, so the
caller learns which certificate to use), and an admin certificate cannot act as a client (the
Federation service refuses it). The servicer reads `RunStatus` snapshots and calls the run only
through `RunControl`, so it knows nothing of the round engine's insides.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format

from fedlink.common.errors import AccessDenied, FedlinkError, PKIError
from fedlink.common.logs import escape_for_log
from fedlink.common.pki import validate_name
from fedlink.server.access import AccessPolicy
from fedlink.server.limits import ClientLimits
from fedlink.server.status import RecentLogs, RunStatus
from fedlink.v1 import admin_pb2 as pb
from fedlink.v1 import admin_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

SERVICE_NAME = "fedlink.v1.Admin"
MAX_REASON = 200
# Admin calls are a person's or a `--watch` loop's: a few per second is plenty.
ADMIN_RATE = 5.0
ADMIN_BURST = 20
ADMIN_CALLS = 4


@dataclass(frozen=True)
class RunControl:
    """The two things an administrator may do to the run."""

    stop: Callable[[str], None]  # stop as SIGTERM does (reason)
    exclude: Callable[[str, str], None]  # drop a client from the run (identity, reason)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(
        self,
        policy: AccessPolicy | None,
        status: RunStatus,
        logs: RecentLogs,
        control: RunControl,
    ) -> None:
        self._policy = policy  # None in --insecure mode: the Admin service is refused
        self._status = status
        self._logs = logs
        self._control = control
        self._limits = ClientLimits(rate=ADMIN_RATE, burst=ADMIN_BURST, max_calls=ADMIN_CALLS)
        if policy is not None and policy.exclusions is not None:
            for identity, why in policy.exclusions.reasons().items():
                status.excluded(identity, why)  # recorded by an earlier coordinator of the run

    async def GetStatus(self, request: pb.GetStatusRequest, context: Context) -> pb.RunStatus:
        with await self._admitted(context):
            reply = json_format.ParseDict(self._status.snapshot(), pb.RunStatus())
            reply.log.extend(pb.LogLine(**line) for line in self._logs.lines(request.max_log_lines))
            return reply

    async def StopRun(self, request: pb.StopRunRequest, context: Context) -> pb.StopRunReply:
        with await self._admitted(context) as admin:
            reason = escape_for_log(request.reason.strip(), MAX_REASON) or "no reason given"
            self._control.stop(f"administrator {admin} asked to stop the run ({reason})")
            return pb.StopRunReply()

    async def ExcludeClient(
        self, request: pb.ExcludeClientRequest, context: Context
    ) -> pb.ExcludeClientReply:
        with await self._admitted(context) as admin:
            assert self._policy is not None and self._policy.exclusions is not None
            try:
                validate_name(request.identity)
            except PKIError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            reason = escape_for_log(request.reason.strip(), MAX_REASON) or "no reason given"
            try:
                added = self._policy.exclusions.add(request.identity, f"{reason}; by {admin}")
            except FedlinkError as exc:  # the state directory cannot be written
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"exclusion not recorded: {exc}")
            if added:
                log.warning(
                    "administrator %s excluded client %s for the rest of the run: %s",
                    admin,
                    request.identity,
                    reason,
                )
            self._control.exclude(request.identity, f"excluded by administrator {admin}: {reason}")
            self._status.excluded(request.identity, reason)
            return pb.ExcludeClientReply(already_excluded=not added)

    async def _admitted(self, context: Context) -> _Admission:
        """The calling administrator's identity, once its certificate is checked and the call is
        admitted by the rate limit; aborts the call otherwise."""
        if self._policy is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "the Admin service needs mutual TLS and an admin certificate; a coordinator in "
                "--insecure mode has neither",
            )
        try:
            peer = self._policy.peer_of(context.auth_context(), role="admin")
            self._policy.check(peer, allow_list=False)
            slot = self._limits.admit(peer.identity)
        except AccessDenied as exc:
            await context.abort(self._refusal_code(context, exc), str(exc))
        # Released on leaving the `with`; a cancelled call's coroutine leaves it too.
        return _Admission(peer.identity, slot.release)

    def _refusal_code(self, context: Context, exc: AccessDenied) -> grpc.StatusCode:
        """PERMISSION_DENIED for a federation client's valid certificate (known, but not an
        administrator); the refusal's own code (UNAUTHENTICATED: no identity) otherwise."""
        assert self._policy is not None
        if exc.code == "UNAUTHENTICATED":
            try:
                self._policy.peer_of(context.auth_context(), role="client")
            except AccessDenied:
                pass
            else:
                return grpc.StatusCode.PERMISSION_DENIED
        return grpc.StatusCode[exc.code]


class _Admission:
    def __init__(self, identity: str, release: Callable[[], None]) -> None:
        self._identity = identity
        self._release = release

    def __enter__(self) -> str:
        return self._identity

    def __exit__(self, *exc: object) -> None:
        self._release()


def add_admin_service(server: grpc.aio.Server, servicer: AdminServicer) -> None:
    pb_grpc.add_AdminServicer_to_server(servicer, server)
