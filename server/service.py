"""The gRPC servicer: translates between protobuf messages and the round engine, nothing more."""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Iterator
from typing import NoReturn

import grpc

from fedlink.common.errors import PKIError, UpdateRejected
from fedlink.common.pki import identity_from_pem
from fedlink.common.wire import JOIN_REQUIRED, SESSION_METADATA_KEY, PayloadInfo
from fedlink.server.config import ServerConfig
from fedlink.server.rounds import ResultHeader, RoundEngine, TaskKind, TaskOffer
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


_KINDS = {
    TaskKind.TRAIN: pb.TASK_KIND_TRAIN,
    TaskKind.EVALUATE: pb.TASK_KIND_EVALUATE,
    TaskKind.WAIT: pb.TASK_KIND_WAIT,
    TaskKind.STOP: pb.TASK_KIND_STOP,
}


class FederationServicer(pb_grpc.FederationServicer):
    def __init__(self, engine: RoundEngine, config: ServerConfig, federation_id: str) -> None:
        self._engine = engine
        self._config = config
        self._federation_id = federation_id
        self._sessions: dict[str, str] = {}
        self._sessions_lock = threading.Lock()

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        if self._config.insecure:
            token = secrets.token_hex(16)
            identity = f"insecure-{token[:8]}"
            with self._sessions_lock:
                self._sessions[token] = identity
            context.set_trailing_metadata(((SESSION_METADATA_KEY, token),))
        else:
            identity = self._identity(context)
        self._engine.join(identity)
        return pb.JoinReply(
            federation_id=self._federation_id,
            identity=identity,
            task=self._config.task,
            task_config=self._config.task_config(),
            chunk_size=self._config.chunk_size,
            heartbeat_interval_seconds=self._config.heartbeat_interval_seconds,
            num_rounds=self._config.num_rounds,
        )

    def PullTask(
        self, request: pb.PullTaskRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.TaskMessage]:
        identity = self._identity(context)
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
        self._engine.count_bytes(down=sent)

    def PushResult(
        self, request_iterator: Iterator[pb.ResultMessage], context: grpc.ServicerContext
    ) -> pb.PushResultReply:
        identity = self._identity(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("message") != "header":
            error = UpdateRejected("INVALID_ARGUMENT", "the first message must be a ResultHeader")
            self._engine.reject_participant(identity, error)
            _abort(context, error)
        try:
            upload = self._engine.open_result(identity, _result_header(first.header))
        except UpdateRejected as exc:
            _abort(context, exc)
        received = 0
        try:
            for message in request_iterator:
                if message.WhichOneof("message") != "chunk":
                    raise UpdateRejected("INVALID_ARGUMENT", "only one ResultHeader per upload")
                upload.add_chunk(message.chunk.offset, message.chunk.data)
                received += len(message.chunk.data)
            self._engine.finish_result(upload)
        except UpdateRejected as exc:
            self._engine.reject_result(upload, exc)
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
        identity = self._identity(context)
        if not self._engine.touch(identity):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, JOIN_REQUIRED)
        return pb.HeartbeatReply(federation_active=self._engine.active)

    def _identity(self, context: grpc.ServicerContext) -> str:
        """Who is calling: the verified client certificate's common name (or, in insecure
        development mode, the session token handed out by Join)."""
        if self._config.insecure:
            metadata = dict(context.invocation_metadata())
            token = metadata.get(SESSION_METADATA_KEY)
            with self._sessions_lock:
                identity = self._sessions.get(token) if isinstance(token, str) else None
            if identity is None:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, JOIN_REQUIRED)
            return identity
        certs = context.auth_context().get("x509_pem_cert")
        if not certs:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        try:
            pem = certs[0]
            return identity_from_pem(pem if isinstance(pem, bytes) else str(pem).encode())
        except PKIError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))


def _abort(context: grpc.ServicerContext, exc: UpdateRejected) -> NoReturn:
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
