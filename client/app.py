"""`fedlink client`: join the federation, then pull tasks and push results until told to stop."""

from __future__ import annotations

import io
import logging
import math
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import FrameType
from typing import IO

import grpc
import torch

from fedlink import __version__
from fedlink.client.config import ClientConfig
from fedlink.client.connection import (
    TRANSIENT_CODES,
    Backoff,
    client_credentials,
    open_channel,
    trust_problem,
)
from fedlink.client.download import ModelSink, descriptor_path, nameless_spool
from fedlink.client.secure import (
    SECURE_STEPS,
    PrivacyFloor,
    SecureParticipant,
    encode_update,
    step_encodings,
)
from fedlink.client.settings import FatalClientError, runs_scaffold, task_settings_from
from fedlink.client.site import LocalSite
from fedlink.common.errors import BelowPrivacyFloor, FedlinkError, PayloadError, SecAggError
from fedlink.common.frames import (
    PULL_TASK,
    PUSH_RESULT,
    ChunkView,
    message_reader,
    serialize,
    trailed_chunks,
)
from fedlink.common.secagg_wire import setup_from_proto
from fedlink.common.tensors import open_state_file
from fedlink.common.wire import (
    ENCODING,
    JOIN_REQUIRED,
    SESSION_METADATA_KEY,
    ByteSink,
    PayloadAssembler,
    PayloadBuffers,
    PayloadInfo,
)
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# A downloaded global model larger than this is refused (a hostile coordinator could otherwise
# fill the client's disk).
MAX_MODEL_BYTES = 64 << 30
# Secure aggregation's step messages (roster, share bundles, unmasking request) are small: a few
# hundred bytes per client of the session.
MAX_MESSAGE_BYTES = 64 << 20
# Leave is a courtesy on the way out: never hold the exit up for long, nor send a whole traceback.
LEAVE_TIMEOUT_SECONDS = 5.0
LEAVE_REASON_CHARS = 500


class FederationClient:
    def __init__(self, config: ClientConfig, channel: grpc.Channel | None = None) -> None:
        """`channel` replaces the one `config` would open (server/inprocess.py: the
        coordinator's services called in the same process, for tests and simulation)."""
        self._config = config
        self._site = LocalSite(config)
        self._credentials = client_credentials(config)
        self._channel = channel if channel is not None else open_channel(config, self._credentials)
        self._stub = pb_grpc.FederationStub(self._channel)
        # The payload streams frame and read their chunk messages without protobuf's copies
        # (common/frames.py); the bytes on the wire are the same.
        self._pull_task = self._channel.unary_stream(
            PULL_TASK,
            request_serializer=pb.PullTaskRequest.SerializeToString,
            response_deserializer=message_reader(pb.TaskMessage),
        )
        self._push_result = self._channel.stream_unary(
            PUSH_RESULT,
            request_serializer=serialize,
            response_deserializer=pb.PushResultReply.FromString,
        )
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._join: pb.JoinReply | None = None
        self._backoff = Backoff(
            maximum=config.reconnect_max_delay_seconds,
            give_up_after=config.reconnect_timeout_seconds,
        )
        self._stop_heartbeat = threading.Event()
        # A call in progress (a long poll, a download, an upload) shows the coordinator that
        # this client is alive: no heartbeats meanwhile. A coordinator too busy to take up an
        # upload would not take up a heartbeat either, and at 10,000 clients heartbeats sent
        # during uploads outnumbered every other call (benchmarks/load.py).
        self._in_call = threading.Event()
        self._secure: SecureParticipant | None = None
        self._spool: IO[bytes] | None = None  # the download spool (_download_spool)
        self._floor = PrivacyFloor(
            min_clients=config.secagg_min_clients,
            min_threshold=config.secagg_min_threshold,
            min_noise_multiplier=config.dp_min_noise_multiplier,
            max_attempts_per_round=config.secagg_max_attempts_per_round,
        )

    @property
    def model(self) -> torch.nn.Module:
        """The federation's model on this site, as the last task left it."""
        return self._site.model

    def run(self) -> int:
        log.info(
            "client running task %s on %s (%d CPU threads)",
            self._config.task,
            self._site.device,
            self._site.threads,
        )
        if self._site.attacking:
            log.warning(
                "SIMULATED ATTACK %r: this client sends malicious updates (evaluation only)",
                self._config.simulate_attack,
            )
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat")
        try:
            if self._connect():
                heartbeat.start()
                self._serve()
            return 0
        except BaseException as exc:
            # Whatever ends this client (a signal, a refusal, the task's own exception), the
            # coordinator hears it now instead of waiting out the liveness timeout.
            self._leave(_leave_reason(exc))
            raise
        finally:
            self._stop_heartbeat.set()
            if heartbeat.is_alive():
                heartbeat.join()  # never close the channel under an in-flight call
            self._channel.close()
            if self._spool is not None:
                self._spool.close()

    def _serve(self) -> None:
        """Carry out tasks until the federation is over."""
        while True:
            try:
                if not self._serve_one_task():
                    log.info("federation finished; exiting")
                    return
                self._backoff.reset()
            except grpc.RpcError as exc:
                code = exc.code()
                if exc.details() == JOIN_REQUIRED:  # the coordinator restarted and forgot us
                    if not self._connect():
                        return
                elif code in TRANSIENT_CODES:
                    if not self._backoff.wait(f"{code.name}: {exc.details()}"):
                        raise FatalClientError("coordinator unreachable for too long") from None
                else:
                    raise FatalClientError(
                        f"the coordinator ended the session: {code.name}: {exc.details()}"
                    ) from None

    def _leave(self, reason: str) -> None:
        """Tell the coordinator this client is going (best effort: it may be unreachable)."""
        if not self._metadata:
            return  # never joined
        try:
            self._stub.Leave(
                pb.LeaveRequest(reason=reason[:LEAVE_REASON_CHARS]),
                metadata=self._metadata,
                timeout=LEAVE_TIMEOUT_SECONDS,
            )
        except grpc.RpcError as exc:
            log.debug("could not tell the coordinator this client leaves: %s", exc.code().name)

    def _connect(self) -> bool:
        """Join the federation; False when the coordinator says its run is already complete."""
        while True:
            try:
                reply, call = self._stub.Join.with_call(
                    pb.JoinRequest(client_version=__version__), timeout=30
                )
                break
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise FatalClientError(
                        f"the coordinator refused this client: {exc.details()}"
                    ) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    # A certificate the bundle cannot trust never fixes itself: do not retry.
                    problem = trust_problem(self._config)
                    if problem is not None:
                        raise FatalClientError(problem) from None
                if code not in TRANSIENT_CODES or not self._backoff.wait(
                    f"{code.name}: {exc.details()}"
                ):
                    raise FatalClientError(
                        f"could not join the federation: {code.name}: {exc.details()}"
                    ) from None
        for key, value in call.trailing_metadata() or ():
            if key == SESSION_METADATA_KEY:
                self._metadata = ((SESSION_METADATA_KEY, str(value)),)
        if reply.task != self._config.task:
            raise FatalClientError(
                f"the coordinator runs task {reply.task!r} but this client is configured for "
                f"{self._config.task!r}; start the client with --task {reply.task}"
            )
        # Settings are checked at once, and a model DP-SGD cannot train is refused before round 1.
        self._site.adopt(reply)
        if reply.finished:
            log.info("federation %s is finished; exiting", reply.federation_id[:8])
            return False
        self._join = reply
        if self._secure is None or reply.identity != self._secure.identity:
            signed = None
            if self._config.state_dir is not None:
                signed = self._config.state_dir / f"secagg-signed-{reply.identity}.json"
            self._secure = SecureParticipant(reply.identity, self._credentials, self._floor, signed)
        self._backoff.reset()
        log.info("joined federation %s as %s", reply.federation_id[:8], reply.identity)
        return True

    def _serve_one_task(self) -> bool:
        """Pull one task and carry it out; False when the federation is over."""
        # A waiting poll shows the coordinator this client is alive: no heartbeats meanwhile
        # (10,000 idle clients would otherwise send 1,000 heartbeats a second).
        with self._calling():
            stream = self._pull_task(pb.PullTaskRequest(), metadata=self._metadata)
            first = next(stream, None)
        if not isinstance(first, pb.TaskMessage) or first.WhichOneof("message") != "header":
            raise FatalClientError("coordinator sent a task stream without a header")
        header = first.header
        if header.kind == pb.TASK_KIND_STOP:
            return False
        if header.kind == pb.TASK_KIND_WAIT:
            if header.retry_after_seconds > 0:
                self._stop_heartbeat.wait(min(header.retry_after_seconds, 60.0))
            return True
        if header.kind in SECURE_STEPS:
            self._secure_step(header, stream)
            return True
        if header.kind not in (pb.TASK_KIND_TRAIN, pb.TASK_KIND_EVALUATE):
            raise FatalClientError(f"coordinator sent unknown task kind {header.kind}")
        if header.kind == pb.TASK_KIND_TRAIN and self._floor.requires_secure_aggregation:
            raise FatalClientError(
                "the coordinator asks for an update without secure aggregation, which it could "
                "read; this site's privacy floor (secagg_min_*, dp_min_noise_multiplier) requires it"
            )
        scaffold = header.kind == pb.TASK_KIND_TRAIN and runs_scaffold(task_settings_from(header))
        self._load_global_model(header, stream, with_control=scaffold)
        if header.kind == pb.TASK_KIND_TRAIN:
            self._train(header, scaffold)
        else:
            self._evaluate(header)
        return True

    def _receive(
        self,
        header: pb.TaskHeader,
        stream: Iterator[pb.TaskMessage | ChunkView],
        sink: ByteSink,
        *,
        encoding: str,
        max_size: int,
    ) -> None:
        """The task's payload chunks into `sink`, checked against the announced size and digest."""
        info = PayloadInfo(header.payload.size, header.payload.blake3, header.payload.encoding)
        with self._calling():
            try:
                assembler = PayloadAssembler(info, sink, max_size=max_size, encoding=encoding)
                for chunk in stream:
                    if not isinstance(chunk, ChunkView):
                        raise PayloadError("unexpected second header in task stream")
                    assembler.add(chunk.offset, chunk.data)
                assembler.finish()
            except PayloadError as exc:
                raise FatalClientError(f"task download failed: {exc}") from None

    def _load_global_model(
        self,
        header: pb.TaskHeader,
        stream: Iterator[pb.TaskMessage | ChunkView],
        *,
        with_control: bool = False,
    ) -> None:
        """Download the task's global model (with SCAFFOLD's control variate, `with_control`),
        checked, into the model's own tensors where it maps onto them (client/download.py);
        otherwise into this client's spool file, and load that (a copy: nothing keeps a view of
        the file, which the next download rewrites)."""
        targets = self._site.download_targets(with_control=with_control)
        sink = ModelSink(targets, header.payload.size, self._rewound_spool)
        self._site.begin_download()
        self._receive(header, stream, sink, encoding=ENCODING, max_size=MAX_MODEL_BYTES)
        if sink.in_place:
            self._site.loaded_in_place()
            return
        spool = self._download_spool()
        spool.truncate()
        spool.flush()
        with open_state_file(descriptor_path(spool)) as state:
            self._site.load_global(state, with_control=with_control)

    def _rewound_spool(self) -> IO[bytes]:
        spool = self._download_spool()
        spool.seek(0)
        return spool

    def _download_spool(self) -> IO[bytes]:
        """One file, rewritten in place by every download: a new file each round would be new
        page cache each round (400 MB for a 100M-parameter model), which costs several times the
        copy itself on a VM that hands freed memory back to its host (docs/large-models.md).
        It has no name, so it is gone when the client exits, however it exits."""
        if self._spool is None:
            self._spool = nameless_spool(self._config.spool_dir)
        return self._spool

    def _train(self, header: pb.TaskHeader, scaffold: bool = False) -> None:
        update = self._site.train_update(header, scaffold)
        taken = self._push(header, update.num_examples, update.metrics, update.payload)
        if update.next_control is not None and taken:
            # c_i moves only when the coordinator took Delta c_i: c stays the mean of the c_i.
            self._site.keep_client_control(update.next_control)

    def _secure_step(
        self, header: pb.TaskHeader, stream: Iterator[pb.TaskMessage | ChunkView]
    ) -> None:
        """One step of a secure-aggregation round. The answer carries no sample count and no
        metrics: the weight is inside the encoded update, and the coordinator learns only sums.
        A step this client cannot or will not take is declined (a result without payload), so
        the coordinator need not wait for it."""
        assert self._secure is not None
        step = pb.TaskKind.Name(header.kind).removeprefix("TASK_KIND_").lower()
        try:
            setup = setup_from_proto(header.secagg)
            expected, answer_encoding = step_encodings(header.kind, setup)
            if header.kind == pb.TASK_KIND_SECAGG_ADVERTISE:
                self._load_global_model(header, stream)
                answer = self._secure.given_answer(header.kind, setup)
                # The global model and the training seed make an update reproducible: a second
                # masked input for the same pair could be subtracted from the first.
                model_digest = header.payload.blake3 + header.seed.to_bytes(8, "big")
                if answer is None:
                    # Before training: a refused session costs no work.
                    self._secure.admit(setup, header.round, model_digest)
                    # Only DP encodes the change from the global model; otherwise skip the copy.
                    global_state = self._site.travelling_copy() if setup.clip_norm > 0 else {}
                    # Metrics are not sent under secure aggregation (DP-SGD's epsilon is logged).
                    result, _, _ = self._site.train(header)
                    vector = encode_update(
                        setup, self._site.travelling(), global_state, result.num_examples
                    )
                    if setup.clip_norm > 0:
                        # What this client actually did: z = std sqrt(t) / S for any sum of t.
                        log.info(
                            "round %d: DP: change clipped to norm %g, Gaussian noise of std "
                            "%.4g added before masking (noise multiplier %.4g for a sum of %d)",
                            header.round,
                            setup.clip_norm,
                            setup.noise_std,
                            setup.noise_std * math.sqrt(setup.params.threshold) / setup.clip_norm,
                            setup.params.threshold,
                        )
                    answer = self._secure.advertise(setup, vector, header.round, model_digest)
            else:
                message = io.BytesIO()
                self._receive(
                    header, stream, message, encoding=expected, max_size=MAX_MESSAGE_BYTES
                )
                answer = self._secure.respond(header.kind, setup, message.getvalue())
        except BelowPrivacyFloor as exc:
            log.error("round %d: refusing %s: %s", header.round, step, exc)
            raise FatalClientError(f"below this site's privacy floor: {exc}") from None
        except SecAggError as exc:
            log.warning("round %d: declining %s: %s", header.round, step, exc)
            self._push(header, 0, {}, None)
            return
        log.info("round %d: %s (%d bytes)", header.round, step, len(answer))
        self._push(header, 0, {}, PayloadBuffers([answer], answer_encoding))

    def _evaluate(self, header: pb.TaskHeader) -> None:
        result = self._site.evaluate(header)
        self._push(header, result.num_examples, result.metrics, None)

    def _push(
        self,
        header: pb.TaskHeader,
        num_examples: int,
        metrics: Mapping[str, float],
        payload: PayloadBuffers | None,
    ) -> bool:
        """Send a result; True when the coordinator took it, False when it refused it."""
        assert self._join is not None
        chunk_size = self._join.chunk_size

        def messages() -> Iterator[pb.ResultMessage | bytes]:
            result = pb.ResultHeader(
                task_id=header.task_id,
                round=header.round,
                num_examples=num_examples,
                metrics=metrics,
            )
            if payload is None:
                yield pb.ResultMessage(header=result)
                return
            # No digest here: it follows the chunks, in a trailer.
            result.payload.CopyFrom(pb.PayloadInfo(size=payload.size, encoding=payload.encoding))
            yield pb.ResultMessage(header=result)
            yield from trailed_chunks(payload, chunk_size)

        while True:
            try:
                with self._calling():
                    self._push_result(messages(), metadata=self._metadata)
                return True
            except grpc.RpcError as exc:
                code = exc.code()
                # The coordinator is over a limit or its disk is full: keep the result and send
                # it again after a pause, rather than pulling and training the task once more.
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED and self._backoff.wait(
                    f"{code.name}: {exc.details()}"
                ):
                    continue
                if code in TRANSIENT_CODES:
                    raise
                # A refused result costs this round only; the next task may still be ours.
                log.warning(
                    "round %d result refused: %s: %s", header.round, code.name, exc.details()
                )
                return False

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """A call to the coordinator in progress: no heartbeats until it ends."""
        self._in_call.set()
        try:
            yield
        finally:
            self._in_call.clear()

    def _heartbeat_loop(self) -> None:
        assert self._join is not None
        interval = max(0.5, self._join.heartbeat_interval_seconds)
        while not self._stop_heartbeat.wait(interval):
            if self._in_call.is_set():
                continue
            try:
                self._stub.Heartbeat(
                    pb.HeartbeatRequest(), metadata=self._metadata, timeout=interval
                )
            except grpc.RpcError as exc:
                log.debug("heartbeat failed: %s", exc.code().name)


def _leave_reason(exc: BaseException) -> str:
    """What the coordinator is told when this client stops with `exc`."""
    if _Signals.received is not None:
        return f"received {_Signals.received}"
    if isinstance(exc, FedlinkError):
        return str(exc)
    return f"the task failed: {type(exc).__name__}: {exc}"


class ShutdownRequested(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT, wherever it is (polling, training, uploading).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows
    it. The task in hand is abandoned: the coordinator hands it to this client again if it comes
    back while the round is open, or closes the round without it once it is silent.
    """


class _Signals:
    """The shutdown signal received, if any. Kept beside the exception because a library can
    catch it on the way and re-raise its own error instead (safetensors, its header check
    interrupted, reports "not a valid safetensors payload"): the shutdown still wins."""

    received: str | None = None


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    _Signals.received = signal.Signals(signum).name
    raise ShutdownRequested(_Signals.received)


def run_client(config: ClientConfig) -> int:
    _Signals.received = None
    previous = {sig: signal.signal(sig, _raise_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return FederationClient(config).run()
    except BaseException as exc:
        # The signal's exception can reach here re-wrapped by whatever it interrupted: a
        # library's own error (safetensors), or a RuntimeError from a class being defined
        # (torch imports torch._dynamo lazily at the first optimizer). Once a shutdown signal
        # has arrived, whatever unwinds the client is that shutdown.
        if _Signals.received is not None:
            log.info("received %s: left the federation", _Signals.received)
            return 0
        if isinstance(exc, FatalClientError):
            log.error("%s", exc)
            return 2
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
