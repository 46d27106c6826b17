"""The gRPC servicer (grpc.aio): translates between protobuf messages and the round engine,
nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, NoReturn, TypeAlias

import grpc

from fedlink.common.codecs import codec_to_proto
from fedlink.common.errors import AccessDenied, StorageError, UpdateRejected, UploadIncomplete
from fedlink.common.frames import (
    FEDERATION_SERVICE,
    ChunkView,
    message_reader,
    serialize,
)
from fedlink.common.logs import escape_for_log
from fedlink.common.secagg_wire import setup_to_proto
from fedlink.common.task_settings import TaskSettings, write_settings
from fedlink.common.tensors import manifest_digest, manifest_entries
from fedlink.common.wire import JOIN_REQUIRED, SESSION_METADATA_KEY, PayloadInfo
from fedlink.server.access import AccessPolicy, Sessions
from fedlink.server.board import LONG_POLL_SECONDS
from fedlink.server.config import ServerConfig
from fedlink.server.downloads import SharedFrames
from fedlink.server.inprocess import HandlerCollector
from fedlink.server.intake import ResultUpload
from fedlink.server.limits import CallSlot, ClientLimits
from fedlink.server.phases import ResultHeader, TaskKind, TaskOffer
from fedlink.server.rounds import RoundEngine
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
    """The federation's calls on grpc.aio: a waiting client (a long poll, an idle stream) is a
    coroutine on the event loop, never a thread. Work that takes CPU or disk time per byte
    (hashing and spooling chunks, validating a complete result) runs on `work`, a pool sized to
    the cores, and never holds the engine's lock while it runs."""

    def __init__(
        self, engine: RoundEngine, config: ServerConfig, federation_id: str, work: Executor
    ) -> None:
        self._board = engine.board  # joins, polls and signs of life
        self._results = engine.results  # result uploads
        self._status = engine.status
        self._task_settings = engine.task_settings  # [task_config] and the strategy's settings
        self._config = config
        self._federation_id = federation_id
        self._work = work
        # Insecure development mode has no certificates, so nothing for a policy to check.
        self._policy = None if config.insecure else AccessPolicy.from_config(config)
        self._sessions = Sessions()
        self._limits = ClientLimits(
            rate=config.rate_limit_per_second,
            burst=config.rate_limit_burst,
            max_calls=config.max_calls_per_client,
        )
        self._refusals_logged: dict[tuple[str, str], float] = {}
        self._codec = codec_to_proto(config.update_codec_spec())
        self._frames = SharedFrames()
        self._frozen_sha256 = engine.frozen_sha256
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

    async def Join(
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.JoinReply:
        if self._config.insecure:
            identity = f"insecure-{secrets.token_hex(4)}"
            token, _ = self._sessions.open(identity, context.peer())
            slot = None
        else:
            identity = await self._verified_identity(context)
            slot = await self._admit(context, identity)
            token, superseded = self._sessions.open(identity, context.peer())
            if superseded:
                # The round engine hands a task that was pulled but not delivered to the new
                # session, so a restarted client picks up where the old process stopped.
                log.warning(
                    "%s joined again from %s; its previous session is superseded",
                    identity,
                    context.peer(),
                )
                self._board.wake(identity)  # the old session's long poll ends now
        try:
            context.set_trailing_metadata(((SESSION_METADATA_KEY, token),))
            self._board.join(identity)
            return pb.JoinReply(
                federation_id=self._federation_id,
                identity=identity,
                task=self._config.task,
                task_config=self._config.hyperparameters(),
                chunk_size=self._config.chunk_size,
                heartbeat_interval_seconds=self._config.heartbeat_interval_seconds,
                num_rounds=self._config.num_rounds,
                model_manifest_sha256=self._model_digest,
                model_manifest=self._model_manifest,
                finished=self._board.tell_finished(identity),
                exchanged_tensors=self._config.exchanged_tensors,
                local_tensors=self._config.local_tensors,
                frozen_sha256=self._frozen_sha256,
            )
        finally:
            if slot is not None:
                slot.release()

    async def PullTask(
        self, request: pb.PullTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.TaskMessage | bytes]:
        identity, slot = await self._caller(context)
        try:
            try:
                offer = await self._next_task(identity, context)
            except UpdateRejected as exc:
                await _abort(context, exc)
            yield pb.TaskMessage(header=_task_header(offer, self._task_settings, self._codec))
            if offer.payload is None:
                return
            sent = 0
            try:
                with self._board.downloading(identity):
                    # Each message waits for the client's flow control, so a slow reader holds
                    # one chunk; the messages of the global model are shared (SharedFrames).
                    for message, size in self._frames.messages(
                        offer.payload, self._config.chunk_size
                    ):
                        yield message
                        sent += size
                        self._status.count_bytes(identity, down=size)
            finally:
                self._board.count_bytes(identity, offer.task_id, down=sent)
        finally:
            slot.release()

    async def _next_task(
        self, identity: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> TaskOffer:
        """The long poll: wait, as a coroutine, until the engine wakes this client or 30 to
        LONG_POLL_SECONDS pass (WAIT: the client polls again). A session superseded while it
        waited is refused when woken (a superseding Join wakes it), never handed a task."""
        loop = asyncio.get_running_loop()
        # Clients that joined together would otherwise re-poll together every minute, for ever:
        # a random length spreads the re-polls of 10,000 idle clients evenly over time.
        deadline = loop.time() + random.uniform(0.5, 1.0) * LONG_POLL_SECONDS
        while True:
            ready = asyncio.Event()
            wake = _waker(loop, ready)
            offer = self._board.poll_task(identity, wake)
            if offer is not None:
                return offer
            try:
                await asyncio.wait_for(ready.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return TaskOffer(TaskKind.WAIT)
            finally:
                self._board.cancel_wake(identity, wake)
            await self._check_session(context, identity)  # woken: superseded meanwhile?

    async def PushResult(
        self,
        request_iterator: AsyncIterator[pb.ResultMessage | ChunkView],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.PushResultReply:
        identity, slot = await self._caller(context)
        try:
            return await self._receive_result(identity, request_iterator, context)
        finally:
            slot.release()

    async def _receive_result(
        self,
        identity: str,
        request_iterator: AsyncIterator[pb.ResultMessage | ChunkView],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.PushResultReply:
        loop = asyncio.get_running_loop()
        messages = aiter(request_iterator)
        try:
            first = await anext(messages, None)
        except UpdateRejected as exc:  # a malformed message (see RequestParsing)
            self._results.reject_participant(identity, exc)
            await _abort(context, exc)
        if not isinstance(first, pb.ResultMessage) or first.WhichOneof("message") != "header":
            error = UpdateRejected("INVALID_ARGUMENT", "the first message must be a ResultHeader")
            self._results.reject_participant(identity, error)
            await _abort(context, error)
        try:
            upload = self._results.open_result(identity, _result_header(first.header))
        except (UpdateRejected, StorageError) as exc:
            await _abort(context, exc)
        received = 0
        try:
            async for chunk in messages:
                if isinstance(chunk, ChunkView):
                    await loop.run_in_executor(
                        self._work, upload.add_chunk, chunk.offset, chunk.data
                    )
                    received += len(chunk.data)
                    self._status.count_bytes(identity, up=len(chunk.data))
                elif chunk.WhichOneof("message") == "trailer":
                    upload.add_trailer(chunk.trailer.blake3)
                else:
                    raise UpdateRejected("INVALID_ARGUMENT", "only one ResultHeader per upload")
        except UpdateRejected as exc:
            self._results.reject_result(upload, exc)
            await _abort(context, exc)
        except UploadIncomplete as exc:
            self._results.abandon_result(upload)
            await _abort(context, exc)
        except StorageError as exc:
            self._results.defer_result(upload, exc)
            await _abort(context, exc)
        except BaseException:
            # The client cancelled or disconnected mid-upload (the call's task is cancelled),
            # or worse: forget the partial upload (a chunk being written finishes first).
            self._results.abandon_result(upload)
            raise
        finally:
            self._board.count_bytes(identity, upload.header.task_id, up=received)
        # Shielded: a client that goes away after its last chunk (gRPC may report that as a
        # complete stream, then cancel the call) still has its result settled with the engine.
        refusal = await asyncio.shield(loop.run_in_executor(self._work, self._settle, upload))
        if refusal is not None:
            await _abort(context, refusal)
        return pb.PushResultReply(accepted=True, message="accepted")

    def _settle(
        self, upload: ResultUpload
    ) -> UpdateRejected | UploadIncomplete | StorageError | None:
        """Finish a complete upload on a worker and tell the engine how it ended; the refusal to
        report to the client, if any. Runs to the end whatever happens to the call meanwhile."""
        try:
            self._results.finish_result(upload)
        except UpdateRejected as exc:
            return exc  # finish_result has recorded the rejection
        except UploadIncomplete as exc:
            self._results.abandon_result(upload)
            return exc
        except StorageError as exc:
            self._results.defer_result(upload, exc)
            return exc
        except BaseException:
            self._results.abandon_result(upload)
            raise
        return None

    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.HeartbeatReply:
        identity, slot = await self._caller(context)
        try:
            if not self._board.touch(identity):
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, JOIN_REQUIRED)
            return pb.HeartbeatReply(federation_active=self._board.active)
        finally:
            slot.release()

    async def Leave(
        self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LeaveReply:
        identity, slot = await self._caller(context)
        try:
            reason = escape_for_log(request.reason, MAX_LEAVE_REASON) or "no reason given"
            self._board.leave(identity, reason)
            return pb.LeaveReply()
        finally:
            slot.release()

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, CallSlot]:
        """Who is calling, checked (access policy, session) and admitted (rate, calls in
        progress). The returned slot must be released when the call ends."""
        if self._config.insecure:
            identity = self._sessions.identity_of(_session_token(context))
            if identity is None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, JOIN_REQUIRED)
        else:
            identity = await self._verified_identity(context)
            await self._check_session(context, identity)
        return identity, await self._admit(context, identity)

    async def _check_session(
        self, context: grpc.aio.ServicerContext[Any, Any], identity: str
    ) -> None:
        """Refuse a call made with a session that is not `identity`'s current one."""
        if self._config.insecure:
            return  # the token is the identity: checked when it was resolved
        try:
            self._sessions.check(identity, _session_token(context))
        except AccessDenied as exc:
            await self._refuse(context, identity, exc)

    async def _verified_identity(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The verified client certificate's common name, once the access policy allows it."""
        assert self._policy is not None  # not called in --insecure mode
        try:
            peer = self._policy.peer_of(context.auth_context())
        except AccessDenied as exc:
            # Whoever made this certificate can make many under any name: log them all under
            # one key, so they cannot flood the log or grow the refusal table.
            await self._refuse(context, UNIDENTIFIED, exc)
        try:
            self._policy.check(peer)
        except AccessDenied as exc:
            # Revoked or expired mid-run: drop it from the current round, which must not wait.
            self._results.reject_participant(peer.identity, UpdateRejected(exc.code, str(exc)))
            await self._refuse(context, peer.identity, exc)
        return peer.identity

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any], identity: str) -> CallSlot:
        """A call slot, released by the handler's `finally` (a cancelled call's coroutine is
        cancelled, so that runs too)."""
        try:
            return self._limits.admit(identity)
        except AccessDenied as exc:
            await self._refuse(context, identity, exc)

    async def _refuse(
        self, context: grpc.aio.ServicerContext[Any, Any], identity: str, exc: AccessDenied
    ) -> NoReturn:
        # One log line per identity and kind of refusal per minute: a client hammering the
        # coordinator must not flood its log.
        key = (identity, exc.code)
        now = time.monotonic()
        if now - self._refusals_logged.get(key, -math.inf) >= REFUSAL_LOG_INTERVAL:
            self._refusals_logged[key] = now
            log.warning("refused %s (%s): %s", identity, context.peer(), exc)
        await context.abort(grpc.StatusCode[exc.code], str(exc))


# Generic only in the type stubs, so the alias is a string.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behavior = Callable[..., Any]


def add_federation_service(servicer: pb_grpc.FederationServicer, server: Any) -> None:
    """Register the Federation service as the generated `add_FederationServicer_to_server`
    does, except that the payload streams' chunk messages are framed and read by
    common/frames.py instead of by protobuf's copies. The bytes on the wire are the same."""
    generated = HandlerCollector()
    pb_grpc.add_FederationServicer_to_server(servicer, generated)
    handlers = {path.rpartition("/")[2]: handler for path, handler in generated.methods.items()}
    handlers["PullTask"] = grpc.unary_stream_rpc_method_handler(
        servicer.PullTask,
        request_deserializer=pb.PullTaskRequest.FromString,
        response_serializer=serialize,
    )
    handlers["PushResult"] = grpc.stream_unary_rpc_method_handler(
        servicer.PushResult,
        request_deserializer=message_reader(pb.ResultMessage),
        response_serializer=pb.PushResultReply.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(FEDERATION_SERVICE, handlers),)
    )
    server.add_registered_method_handlers(FEDERATION_SERVICE, handlers)


class RequestParsing(grpc.aio.ServerInterceptor):
    """Parse every request message inside the handler instead of in gRPC.

    gRPC Python (1.85, sync server) never released the state of a call whose request failed to
    deserialize ("Exception deserializing request!"): about 19 KB stayed allocated per malformed
    request, so any client with a certificate could grow the coordinator's memory without
    bound. With the parsing in the handler, a malformed message is answered INVALID_ARGUMENT and
    the call ends like any other, whatever the server's implementation does. Applies to every
    service on the server, the health service included (only PushResult takes a request stream;
    its handler turns a malformed message into a status).
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        serialize = handler.response_serializer
        if handler.request_streaming:
            assert not handler.response_streaming and handler.stream_unary is not None
            return grpc.stream_unary_rpc_method_handler(
                _parsing_stream(handler.stream_unary, parse), response_serializer=serialize
            )
        if handler.response_streaming:
            assert handler.unary_stream is not None
            return grpc.unary_stream_rpc_method_handler(
                _parsing_unary_stream(handler.unary_stream, parse), response_serializer=serialize
            )
        assert handler.unary_unary is not None
        return grpc.unary_unary_rpc_method_handler(
            _parsing_unary(handler.unary_unary, parse), response_serializer=serialize
        )


def _parsing_unary(behavior: Behavior, parse: Callable[[bytes], Any]) -> Behavior:
    async def parsed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await behavior(await _parse(parse, raw, context), context)

    return parsed


def _parsing_unary_stream(behavior: Behavior, parse: Callable[[bytes], Any]) -> Behavior:
    async def parsed(raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async for reply in behavior(await _parse(parse, raw, context), context):
            yield reply

    return parsed


def _parsing_stream(behavior: Behavior, parse: Callable[[bytes], Any]) -> Behavior:
    async def parsed(raw: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return await behavior(_parsed_stream(parse, raw), context)

    return parsed


async def _parsed_stream(parse: Callable[[bytes], Any], raw: AsyncIterator[bytes]) -> Any:
    # A generator function, not an expression: gRPC's request iterator is only started if the
    # handler reads it (a call refused before that would leave it never awaited).
    async for message in raw:
        yield _parse_streamed(parse, message)


def _waker(loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> Callable[[], None]:
    """A wake-up the engine may call from any thread: sets `ready` on the loop's thread."""

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(ready.set)

    return wake


MALFORMED = "malformed request: not a valid protobuf message"


async def _parse(
    parse: Callable[[bytes], Any], raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
) -> Any:
    try:
        return parse(raw)
    except Exception:  # protobuf's DecodeError, or anything else the parser raises
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, MALFORMED)


def _parse_streamed(parse: Callable[[bytes], Any], raw: bytes) -> Any:
    """A message of a request stream. A malformed one raises UpdateRejected in the handler
    reading the stream, which ends the upload as misbehaviour, not as a client that went away."""
    try:
        return parse(raw)
    except Exception:  # protobuf's DecodeError, or anything else the parser raises
        raise UpdateRejected("INVALID_ARGUMENT", MALFORMED) from None


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any],
    exc: UpdateRejected | UploadIncomplete | AccessDenied | StorageError,
) -> NoReturn:
    await context.abort(grpc.StatusCode[exc.code], str(exc))


def _session_token(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The session token the call carries (Join's trailing metadata, sent back), if any."""
    token = dict(context.invocation_metadata() or ()).get(SESSION_METADATA_KEY)
    return token if isinstance(token, str) else None


def _task_header(
    offer: TaskOffer, task_config: TaskSettings, codec: pb.UpdateCodec
) -> pb.TaskHeader:
    header = pb.TaskHeader(
        task_id=offer.task_id, round=offer.round, kind=_KINDS[offer.kind], seed=offer.seed
    )
    if offer.kind in (TaskKind.TRAIN, TaskKind.EVALUATE, TaskKind.SECAGG_ADVERTISE):
        write_settings(header.task_config, task_config)  # the steps that run the task's code
    if offer.kind is TaskKind.TRAIN:
        header.update_codec.CopyFrom(codec)
    if offer.kind is TaskKind.WAIT:
        header.retry_after_seconds = 0.0
    if offer.payload is not None:
        info = offer.payload.info
        header.payload.CopyFrom(
            pb.PayloadInfo(size=info.size, blake3=info.blake3, encoding=info.encoding)
        )
    if offer.secagg is not None:
        header.secagg.CopyFrom(setup_to_proto(offer.secagg))
    return header


def _result_header(header: pb.ResultHeader) -> ResultHeader:
    payload = None
    if header.HasField("payload"):
        payload = PayloadInfo(
            size=header.payload.size, blake3=header.payload.blake3, encoding=header.payload.encoding
        )
    return ResultHeader(
        task_id=header.task_id,
        round=header.round,
        num_examples=header.num_examples,
        metrics=dict(header.metrics),
        payload=payload,
    )
