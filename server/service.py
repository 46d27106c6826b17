"""The gRPC servicer: translates between protobuf messages and the round engine, nothing more."""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeAlias

import grpc

from fedlink.common.errors import AccessDenied, StorageError, UpdateRejected, UploadIncomplete
from fedlink.common.logs import escape_for_log
from fedlink.common.secagg_wire import setup_to_proto
from fedlink.common.tensors import manifest_digest, manifest_entries
from fedlink.common.wire import JOIN_REQUIRED, SESSION_METADATA_KEY, PayloadInfo
from fedlink.server.access import AccessPolicy, Sessions
from fedlink.server.config import ServerConfig
from fedlink.server.limits import CallSlot, ClientLimits
from fedlink.server.rounds import ResultHeader, RoundEngine, TaskKind, TaskOffer
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# Characters of a leaving client's reason that reach the log (a traceback's last line fits).
MAX_LEAVE_REASON = 500

# Tensors listed in JoinReply beside the fingerprint (a ResNet-50 has ~320); a larger model
# sends only the hash, which keeps the reply far below gRPC's message limit.
MAX_MANIFEST_ENTRIES = 4096

# Seconds between log lines about the same client being refused for the same reason.
REFUSAL_LOG_INTERVAL = 60.0

# How refusals of certificates that establish no identity are logged.
UNIDENTIFIED = "an unacceptable certificate"


_KINDS = {
    TaskKind.TRAIN: pb.TASK_KIND_TRAIN,
    TaskKind.EVALUATE: pb.TASK_KIND_EVALUATE,
    TaskKind.WAIT: pb.TASK_KIND_WAIT,
    TaskKind.STOP: pb.TASK_KIND_STOP,
    TaskKind.SECAGG_ADVERTISE: pb.TASK_KIND_SECAGG_ADVERTISE,
    TaskKind.SECAGG_SHARE_KEYS: pb.TASK_KIND_SECAGG_SHARE_KEYS,
    TaskKind.SECAGG_MASKED_INPUT: pb.TASK_KIND_SECAGG_MASKED_INPUT,
    TaskKind.SECAGG_CONSISTENCY: pb.TASK_KIND_SECAGG_CONSISTENCY,
    TaskKind.SECAGG_UNMASK: pb.TASK_KIND_SECAGG_UNMASK,
}


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, engine: RoundEngine, config: ServerConfig, federation_id: str) -> None:
        self._engine = engine
        self._config = config
        self._federation_id = federation_id
        # Insecure development mode has no certificates, so nothing for a policy to check.
        self._policy = None if config.insecure else AccessPolicy.from_config(config)
        self._sessions = Sessions()
        self._limits = ClientLimits(
            rate=config.rate_limit_per_second,
            burst=config.rate_limit_burst,
            max_calls=config.max_calls_per_client,
        )
        self._refusals_logged: dict[tuple[str, str], float] = {}
        entries = manifest_entries(engine.manifest)
        self._model_digest = manifest_digest(entries)
        self._model_manifest = [
            pb.TensorManifestEntry(name=name, dtype=dtype, shape=shape)
            for name, dtype, shape in entries
            if len(entries) <= MAX_MANIFEST_ENTRIES
        ]

    @property
    def policy(self) -> AccessPolicy | None:
        """The allow-list and revocation list, shared with the health service (None in
        --insecure mode)."""
        return self._policy

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if self._config.insecure:
            identity = f"insecure-{secrets.token_hex(4)}"
            token, _ = self._sessions.open(identity, context.peer())
            slot = None
        else:
            identity = self._verified_identity(context)
            slot = self._admit(context, identity)
            token, superseded = self._sessions.open(identity, context.peer())
            if superseded:
                # The round engine hands a task that was pulled but not delivered to the new
                # session, so a restarted client picks up where the old process stopped.
                log.warning(
                    "%s joined again from %s; its previous session is superseded",
                    identity,
                    context.peer(),
                )
        try:
            context.set_trailing_metadata(((SESSION_METADATA_KEY, token),))
            self._engine.join(identity)
            return pb.JoinReply(
                federation_id=self._federation_id,
                identity=identity,
                task=self._config.task,
                task_config=self._config.task_config(),
                chunk_size=self._config.chunk_size,
                heartbeat_interval_seconds=self._config.heartbeat_interval_seconds,
                num_rounds=self._config.num_rounds,
                model_manifest_sha256=self._model_digest,
                model_manifest=self._model_manifest,
            )
        finally:
            if slot is not None:
                slot.release()

    def PullTask(
        self, request: pb.PullTaskRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TaskMessage]:
        identity, slot = self._caller(context)
        try:
            yield from self._task_stream(identity, context)
        finally:
            slot.release()

    def _task_stream(
        self, identity: str, context: grpc.ServicerContext
    ) -> Iterator[pb.TaskMessage]:
        try:
            offer = self._engine.next_task(identity)
        except UpdateRejected as exc:
            _abort(context, exc)
        yield pb.TaskMessage(header=_task_header(offer))
        if offer.payload is None:
            return
        sent = 0
        for offset, data in offer.payload.chunks(self._config.chunk_size):
            if not context.is_active():
                break
            yield pb.TaskMessage(chunk=pb.Chunk(offset=offset, data=data))
            sent += len(data)
            self._engine.status.count_bytes(identity, down=len(data))
        self._engine.count_bytes(down=sent)

    def PushResult(
        self, request_iterator: Iterator[pb.ResultMessage], context: grpc.ServicerContext
    ) -> pb.PushResultReply:
        identity, slot = self._caller(context)
        try:
            return self._receive_result(identity, request_iterator, context)
        finally:
            slot.release()

    def _receive_result(
        self,
        identity: str,
        request_iterator: Iterator[pb.ResultMessage],
        context: grpc.ServicerContext,
    ) -> pb.PushResultReply:
        try:
            first = next(request_iterator, None)
        except UpdateRejected as exc:  # a malformed message (see RequestParsing)
            self._engine.reject_participant(identity, exc)
            _abort(context, exc)
        if first is None or first.WhichOneof("message") != "header":
            error = UpdateRejected("INVALID_ARGUMENT", "the first message must be a ResultHeader")
            self._engine.reject_participant(identity, error)
            _abort(context, error)
        try:
            upload = self._engine.open_result(identity, _result_header(first.header))
        except (UpdateRejected, StorageError) as exc:
            _abort(context, exc)
        received = 0
        try:
            for message in request_iterator:
                if message.WhichOneof("message") != "chunk":
                    raise UpdateRejected("INVALID_ARGUMENT", "only one ResultHeader per upload")
                upload.add_chunk(message.chunk.offset, message.chunk.data)
                received += len(message.chunk.data)
                self._engine.status.count_bytes(identity, up=len(message.chunk.data))
            self._engine.finish_result(upload)
        except UpdateRejected as exc:
            self._engine.reject_result(upload, exc)
            _abort(context, exc)
        except UploadIncomplete as exc:
            self._engine.abandon_result(upload)
            _abort(context, exc)
        except StorageError as exc:
            self._engine.defer_result(upload, exc)
            _abort(context, exc)
        except BaseException:
            # The client cancelled or disconnected mid-upload (grpc.RpcError), or worse.
            self._engine.abandon_result(upload)
            raise
        finally:
            self._engine.count_bytes(up=received)
        return pb.PushResultReply(accepted=True, message="accepted")

    def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.ServicerContext
    ) -> pb.HeartbeatReply:
        identity, slot = self._caller(context)
        try:
            if not self._engine.touch(identity):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, JOIN_REQUIRED)
            return pb.HeartbeatReply(federation_active=self._engine.active)
        finally:
            slot.release()

    def Leave(self, request: pb.LeaveRequest, context: grpc.ServicerContext) -> pb.LeaveReply:
        identity, slot = self._caller(context)
        try:
            reason = escape_for_log(request.reason, MAX_LEAVE_REASON) or "no reason given"
            self._engine.leave(identity, reason)
            return pb.LeaveReply()
        finally:
            slot.release()

    def _caller(self, context: grpc.ServicerContext) -> tuple[str, CallSlot]:
        """Who is calling, checked (access policy, session) and admitted (rate, calls in
        progress). The returned slot must be released when the call ends."""
        token = dict(context.invocation_metadata()).get(SESSION_METADATA_KEY)
        token = token if isinstance(token, str) else None
        if self._config.insecure:
            identity = self._sessions.identity_of(token)
            if identity is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, JOIN_REQUIRED)
        else:
            identity = self._verified_identity(context)
            try:
                self._sessions.check(identity, token)
            except AccessDenied as exc:
                self._refuse(context, identity, exc)
        return identity, self._admit(context, identity)

    def _verified_identity(self, context: grpc.ServicerContext) -> str:
        """The verified client certificate's common name, once the access policy allows it."""
        assert self._policy is not None  # not called in --insecure mode
        try:
            peer = self._policy.peer_of(context.auth_context())
        except AccessDenied as exc:
            # Whoever made this certificate can make many under any name: log them all under
            # one key, so they cannot flood the log or grow the refusal table.
            self._refuse(context, UNIDENTIFIED, exc)
        try:
            self._policy.check(peer)
        except AccessDenied as exc:
            # Revoked or expired mid-run: drop it from the current round, which must not wait.
            self._engine.reject_participant(peer.identity, UpdateRejected(exc.code, str(exc)))
            self._refuse(context, peer.identity, exc)
        return peer.identity

    def _admit(self, context: grpc.ServicerContext, identity: str) -> CallSlot:
        try:
            slot = self._limits.admit(identity)
        except AccessDenied as exc:
            self._refuse(context, identity, exc)
        # Released by the handler's `finally`, or here when gRPC ends the call without resuming
        # the handler (a cancelled stream).
        context.add_callback(slot.release)
        return slot

    def _refuse(self, context: grpc.ServicerContext, identity: str, exc: AccessDenied) -> NoReturn:
        # One log line per identity and kind of refusal per minute: a client hammering the
        # coordinator must not flood its log.
        key = (identity, exc.code)
        now = time.monotonic()
        if now - self._refusals_logged.get(key, -math.inf) >= REFUSAL_LOG_INTERVAL:
            self._refusals_logged[key] = now
            log.warning("refused %s (%s): %s", identity, context.peer(), exc)
        context.abort(grpc.StatusCode[exc.code], str(exc))


# Generic only in the type stubs, so the alias is a string.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behavior = Callable[[Any, grpc.ServicerContext], Any]


class RequestParsing(grpc.ServerInterceptor):
    """Parse every request message inside the handler instead of in gRPC.

    gRPC Python (1.85) never releases the state of a call whose request fails to deserialize
    ("Exception deserializing request!"): about 19 KB stays allocated per malformed request, so
    any client with a certificate could grow the coordinator's memory without bound. With the
    parsing moved into the handler, a malformed message is answered INVALID_ARGUMENT and the call
    ends normally. Applies to every service on the server, the health service included (only
    PushResult takes a request stream; its handler turns a malformed message into a status).
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Handler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        if handler.request_streaming:
            stream = handler.stream_stream if handler.response_streaming else handler.stream_unary
            assert stream is not None
            parsed_stream = _parsing_stream(stream, parse)
            if handler.response_streaming:
                return grpc.stream_stream_rpc_method_handler(
                    parsed_stream, response_serializer=serialize
                )
            return grpc.stream_unary_rpc_method_handler(
                parsed_stream, response_serializer=serialize
            )
        unary = handler.unary_stream if handler.response_streaming else handler.unary_unary
        assert unary is not None
        parsed_unary = _parsing_unary(unary, parse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(parsed_unary, response_serializer=serialize)
        return grpc.unary_unary_rpc_method_handler(parsed_unary, response_serializer=serialize)


def _parsing_unary(behavior: Behavior, parse: Callable[[bytes], Any]) -> Behavior:
    def parsed(raw: bytes, context: grpc.ServicerContext, *respond: Any) -> Any:
        return behavior(_parse(parse, raw, context), context, *respond)

    return _scheduled_like(parsed, behavior)


def _parsing_stream(behavior: Behavior, parse: Callable[[bytes], Any]) -> Behavior:
    def parsed(raw: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        return behavior((_parse_streamed(parse, message) for message in raw), context)

    return _scheduled_like(parsed, behavior)


# gRPC reads these attributes of a handler to decide where it runs: `experimental_non_blocking`
# (a server stream answered through a callback, holding no thread while it waits; the health
# service's Watch) and `experimental_thread_pool` (a pool of its own). A wrapper that dropped
# them put every Watch stream on a pool thread for as long as it stayed open.
_SCHEDULING = ("experimental_non_blocking", "experimental_thread_pool")


def _scheduled_like(wrapper: Behavior, behavior: Behavior) -> Behavior:
    for name in _SCHEDULING:
        if hasattr(behavior, name):
            setattr(wrapper, name, getattr(behavior, name))
    return wrapper


MALFORMED = "malformed request: not a valid protobuf message"


def _parse(parse: Callable[[bytes], Any], raw: bytes, context: grpc.ServicerContext) -> Any:
    try:
        return parse(raw)
    except Exception:  # protobuf's DecodeError, or anything else the parser raises
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)


def _parse_streamed(parse: Callable[[bytes], Any], raw: bytes) -> Any:
    """A message of a request stream. A malformed one raises UpdateRejected in the handler
    reading the stream, which ends the upload as misbehaviour, not as a client that went away."""
    try:
        return parse(raw)
    except Exception:  # protobuf's DecodeError, or anything else the parser raises
        raise UpdateRejected("INVALID_ARGUMENT", MALFORMED) from None


def _abort(
    context: grpc.ServicerContext,
    exc: UpdateRejected | UploadIncomplete | AccessDenied | StorageError,
) -> NoReturn:
    context.abort(grpc.StatusCode[exc.code], str(exc))


def _task_header(offer: TaskOffer) -> pb.TaskHeader:
    header = pb.TaskHeader(
        task_id=offer.task_id, round=offer.round, kind=_KINDS[offer.kind], seed=offer.seed
    )
    if offer.kind is TaskKind.WAIT:
        header.retry_after_seconds = 0.0
    if offer.payload is not None:
        info = offer.payload.info
        header.payload.CopyFrom(
            pb.PayloadInfo(size=info.size, sha256=info.sha256, encoding=info.encoding)
        )
    if offer.secagg is not None:
        header.secagg.CopyFrom(setup_to_proto(offer.secagg))
    return header


def _result_header(header: pb.ResultHeader) -> ResultHeader:
    payload = None
    if header.HasField("payload"):
        payload = PayloadInfo(
            size=header.payload.size, sha256=header.payload.sha256, encoding=header.payload.encoding
        )
    return ResultHeader(
        task_id=header.task_id,
        round=header.round,
        num_examples=header.num_examples,
        metrics=dict(header.metrics),
        payload=payload,
    )
