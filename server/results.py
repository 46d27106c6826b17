"""Results: the events of a client's result, from its header to accepted or refused.

The transport calls `open_result` when a result header arrives (checked before any payload
byte is taken), then `finish_result` once the payload is complete (validated in the transport's
worker threads, several at once, with no lock held; a plain training update's values were
measured on the way in, server/inspection.py), or `reject_result` / `abandon_result` /
`defer_result` when the upload breaks the protocol, is cut off, or cannot be stored. What is
accepted goes on the open phase on the board (server/board.py); the upload's bytes are
server/intake.py's business.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from fedlink.common.codecs import decompress_update
from fedlink.common.errors import PayloadError, StorageError, TensorFormatError, UpdateRejected
from fedlink.common.secagg_wire import SecAggStep
from fedlink.common.tensors import Manifest, open_state_file, save_state_file
from fedlink.common.wire import ENCODING, PayloadFile
from fedlink.server.aggregation import SUM_LIMIT
from fedlink.server.board import PhaseBoard
from fedlink.server.config import ServerConfig
from fedlink.server.inspection import Findings, MappedModels, UpdateInspector
from fedlink.server.intake import ResultUpload, Spool
from fedlink.server.phases import AcceptedUpdate, Phase, ResultHeader, TaskKind
from fedlink.server.secure_rounds import take_secure_message
from fedlink.server.validation import (
    check_distance,
    check_layout,
    check_magnitudes,
    check_metrics,
    check_num_examples,
    check_update,
    check_update_bound,
    model_norm,
)

log = logging.getLogger(__name__)

# Bytes a result payload may exceed the global model's own encoding by (header formatting).
PAYLOAD_SLACK_BYTES = 1 << 20
# Secure aggregation's step messages (keys, share bundles, unmasking shares): at most this much
# plus SECAGG_BYTES_PER_PEER for every other client of the session.
SECAGG_MESSAGE_BYTES = 64 << 10
SECAGG_BYTES_PER_PEER = 1 << 10
# Updates of models up to this size are validated several at once (one per worker); larger
# ones one at a time, so that the coordinator's memory stays a few times the model's size.
PARALLEL_VALIDATION_MAX_BYTES = 64 << 20
# Uploads never take the last (global model size + this) bytes of the state directory's file
# system: that is what publishing the next model and its checkpoint needs.
CHECKPOINT_ROOM_BYTES = 256 << 10


class ResultIntake:
    def __init__(
        self,
        config: ServerConfig,
        board: PhaseBoard,
        spool: Spool,
        manifest: Manifest,
        global_file: Callable[[], PayloadFile],
        extra: Manifest | None = None,
    ) -> None:
        self._config = config
        self._board = board
        self._spool = spool
        self._manifest = manifest
        # The strategy's extra tensors every training result carries beside the model
        # (Strategy.upload_manifest: SCAFFOLD's Delta c_i), checked with it.
        self._extra = extra or {}
        self._upload_manifest = {**manifest, **self._extra}
        self._extra_bytes = sum(
            math.prod(spec.shape) * spec.dtype.itemsize for spec in self._extra.values()
        )
        self._global_file = global_file
        # Secure aggregation: advertised keys must be signed by their client's certificate.
        self._ca_pem = None if config.insecure or config.ca is None else config.ca.read_bytes()
        self._secure_lock = threading.Lock()  # secure aggregation's state takes one at a time
        self._large_validation = threading.Lock()
        self._mapped_models = MappedModels()  # what the inspectors measure updates against
        self._codec = config.update_codec_spec()
        if not self._codec.plain:
            log.info("updates: %s (%s)", self._codec.describe(), self._codec.encoding)

    def open_result(self, identity: str, header: ResultHeader) -> ResultUpload:
        """Check a result header before any payload byte is accepted."""
        board = self._board
        with board.cond:
            phase = board.phase
            if phase is None or not phase.open or header.task_id != phase.task_id:
                current = f"round {phase.round}" if phase is not None else "no round"
                raise UpdateRejected(
                    "FAILED_PRECONDITION",
                    f"task {header.task_id!r} is not the current task ({current} in progress); "
                    "pull a new task",
                )
            if header.round != phase.round:
                raise UpdateRejected(
                    "FAILED_PRECONDITION",
                    f"result is for round {header.round}; the current round is {phase.round}",
                )
            if identity not in phase.participants:
                raise UpdateRejected(
                    "PERMISSION_DENIED", f"{identity} was not assigned task {phase.task_id}"
                )
            if identity in phase.submitted or identity in phase.finished:
                raise UpdateRejected(
                    "ALREADY_EXISTS",
                    f"{identity} already submitted a result for round {phase.round}",
                )
            phase.submitted.add(identity)
        try:
            upload = self._start_upload(identity, header, phase)
        except UpdateRejected as exc:
            self._reject(phase, identity, exc)
            raise
        except StorageError:
            with board.cond:
                phase.submitted.discard(identity)  # not the client's fault: it may retry
            raise
        log.debug("receiving %s result from %s (round %d)", phase.kind.value, identity, phase.round)
        return upload

    def _start_upload(self, identity: str, header: ResultHeader, phase: Phase) -> ResultUpload:
        if phase.secure is None:
            check_num_examples(header.num_examples, self._config.max_num_examples)
            check_metrics(header.metrics)
        # Under secure aggregation the weight is inside the masked vector and metrics would
        # tell about one client's update: both fields are ignored.
        if phase.kind is TaskKind.TRAIN and header.payload is None:
            raise UpdateRejected("INVALID_ARGUMENT", "a training result must carry a payload")
        if phase.kind is TaskKind.EVALUATE and header.payload is not None:
            raise UpdateRejected("INVALID_ARGUMENT", "an evaluation result carries no payload")
        if phase.kind is TaskKind.TRAIN and header.payload is not None:
            self._check_codec(header.payload.encoding)
        if phase.secure is not None and header.payload is None:
            raise UpdateRejected(
                "FAILED_PRECONDITION",
                f"{identity} declined secure-aggregation step {phase.kind.value}",
            )
        encoding, max_size = self._expected_payload(phase)
        reserved = 0
        if header.payload is not None and header.payload.size <= max_size:
            # The room the next global model and its checkpoint need is never handed out.
            global_size = self._global_file().info.size
            keep_free = global_size + CHECKPOINT_ROOM_BYTES
            # An encoded update is decoded next to itself: room for the full model too.
            decoded = 0 if self._codec.plain else global_size
            reserved = self._spool.reserve(header.payload.size + decoded, keep_free)
        spool = self._spool.take() if header.payload is not None else None
        inspector = None
        if (
            phase.kind is TaskKind.TRAIN
            and phase.secure is None
            and self._codec.plain
            and header.payload is not None
        ):
            inspector = self._inspector(phase.payload.path, header.payload.size)
        try:
            return ResultUpload(
                identity,
                header,
                phase,
                spool,
                max_size=max_size,
                encoding=encoding,
                release=lambda: self._spool.release(reserved),
                # Secure aggregation keeps nothing of a client's (docs/privacy.md): its step
                # messages are deleted, never left to a later upload to overwrite.
                discard=self._spool.recycle if phase.secure is None else _delete,
                inspector=inspector,
            )
        except (PayloadError, StorageError) as exc:
            self._spool.release(reserved)
            if spool is not None:
                self._spool.recycle(spool)  # untouched: nothing of this upload was written
            if isinstance(exc, StorageError):
                raise
            code = "RESOURCE_EXHAUSTED" if "exceeds the limit" in str(exc) else "INVALID_ARGUMENT"
            raise UpdateRejected(code, str(exc)) from None

    def _inspector(self, global_path: Path, size: int) -> UpdateInspector:
        """Measures a plain training update as it arrives (against the global model when updates
        are bounded), so that a complete one is judged without being read again."""
        if self._config.max_update_norm_ratio <= 0:
            return UpdateInspector(self._upload_manifest, size)
        return UpdateInspector(
            self._upload_manifest,
            size,
            reference=lambda: self._mapped_models.acquire(global_path),
            release=lambda: self._mapped_models.release(global_path),
        )

    def _expected_payload(self, phase: Phase) -> tuple[str, int]:
        """The encoding and largest size of a result payload in `phase`."""
        if phase.secure is None and phase.kind is TaskKind.TRAIN and not self._codec.plain:
            return self._codec.encoding, self._codec.max_payload_bytes(self._manifest)
        if phase.secure is None:
            extra = self._extra_bytes if phase.kind is TaskKind.TRAIN else 0
            return ENCODING, self._global_file().info.size + extra + PAYLOAD_SLACK_BYTES
        params = phase.secure.setup.params
        step = SecAggStep[phase.kind.name.removeprefix("SECAGG_")]
        _, encoding = step.encodings(params.ring_bits)
        if step is SecAggStep.MASKED_INPUT:
            return encoding, params.vector_length * params.dtype.itemsize
        return encoding, SECAGG_MESSAGE_BYTES + SECAGG_BYTES_PER_PEER * len(phase.participants)

    def finish_result(self, upload: ResultUpload) -> None:
        """Verify the complete payload and validate it; an accepted update waits on disk until
        the round is aggregated, a secure-aggregation message is taken in at once.

        Called from the transport's worker threads: several results are validated at once, with
        no lock held (validation reads a whole mapped update). Only secure aggregation's state,
        which is not thread-safe, takes its messages one at a time. A phase closes only once no
        result of it is being validated, so a result is either fully taken in before the phase
        closes, or refused."""
        board, phase = self._board, upload.phase
        accepted = False
        upload_seconds = time.monotonic() - upload.started
        try:
            upload.complete_payload()
            with board.cond:
                if not phase.open:
                    raise UpdateRejected(
                        "DEADLINE_EXCEEDED",
                        f"round {phase.round} closed before the result arrived",
                    )
                phase.validating += 1
            try:
                magnitude = 0.0
                findings = upload.inspector.findings() if upload.inspector else None
                if findings is not None:
                    magnitude = self._judge_update(phase, upload, findings)
                elif phase.kind is TaskKind.TRAIN:
                    # Read back whole, a large model's updates are validated one at a time: each
                    # validation maps a whole update and the global model, and memory must stay
                    # O(model).
                    large = phase.payload.info.size > PARALLEL_VALIDATION_MAX_BYTES
                    with self._large_validation if large else contextlib.nullcontext():
                        magnitude = self._validate_update(phase, upload)
                if phase.secure is not None:
                    assert upload.spool is not None
                    with self._secure_lock:
                        take_secure_message(
                            phase.kind, phase.secure, upload.identity, upload.spool, self._ca_pem
                        )
                with board.cond:
                    self._take(phase, upload, magnitude)
            finally:
                with board.cond:
                    phase.validating -= 1
                    board.cond.notify_all()
            accepted = True
        except UpdateRejected as exc:
            self._reject(phase, upload.identity, exc)
            raise
        finally:
            upload.close(keep=accepted and phase.kind is TaskKind.TRAIN)
        board.metrics.updates.labels(phase.kind.value, "accepted").inc()
        board.status.result_accepted(upload.identity, phase.round, phase.kind.value)
        if board.client_rows is not None:
            header = upload.header
            board.client_rows.accepted(
                phase, upload.identity, header.num_examples, header.metrics, upload_seconds
            )
        log.debug(
            "accepted %s result from %s (round %d)", phase.kind.value, upload.identity, phase.round
        )

    def _take(self, phase: Phase, upload: ResultUpload, magnitude: float) -> None:
        """Record a validated result on its phase (with the board's lock held)."""
        if phase.kind is TaskKind.TRAIN:
            assert upload.spool is not None
            # Refuse an update that could push the aggregate out of the finite range (checked
            # whatever max_update_norm_ratio says).
            if not phase.weighted_magnitude + magnitude <= SUM_LIMIT:
                raise UpdateRejected(
                    "INVALID_ARGUMENT",
                    "update would make the aggregate non-finite: num_examples x its largest "
                    f"value = {magnitude:.3g}",
                )
            phase.weighted_magnitude += magnitude
            phase.accepted[upload.identity] = AcceptedUpdate(
                float(upload.header.num_examples), upload.spool
            )
        if phase.secure is None:
            phase.metrics.append((upload.header.num_examples, dict(upload.header.metrics)))
        phase.delivered.add(upload.identity)
        phase.finished.add(upload.identity)

    def _judge_update(self, phase: Phase, upload: ResultUpload, findings: Findings) -> float:
        """`_validate_update` for an update measured as it arrived: the same checks, from the
        stored file's header and the inspector's measurements (no tensor is read again)."""
        assert upload.spool is not None
        ratio = self._config.max_update_norm_ratio
        try:
            with open_state_file(upload.spool) as state:  # safetensors checks the header
                self._check_extra(state)
                check_layout(state, self._upload_manifest)
            largest = check_magnitudes(findings.magnitudes)
            if ratio > 0:
                check_distance(
                    findings.squared_distance, ratio=ratio, global_norm=self._global_norm(phase)
                )
        except TensorFormatError as exc:
            raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None
        return float(upload.header.num_examples) * largest

    def _validate_update(self, phase: Phase, upload: ResultUpload) -> float:
        """Check a training update against the model and max_update_norm_ratio; its weighted
        magnitude (what it can add to the FedAvg sum)."""
        assert upload.spool is not None
        weight = float(upload.header.num_examples)
        ratio = self._config.max_update_norm_ratio
        try:
            if not self._codec.plain:
                self._decode_update(phase, upload.spool)
            with open_state_file(upload.spool) as state:
                self._check_extra(state)
                largest = check_update(state, self._upload_manifest)
                if ratio > 0:
                    # The bound is on the model's move; the extra tensors are held to the sum
                    # limit below, like every value of an update.
                    model = {name: state[name] for name in self._manifest}
                    global_norm = self._global_norm(phase)
                    with open_state_file(phase.payload.path) as global_state:
                        check_update_bound(
                            model, global_state, ratio=ratio, global_norm=global_norm
                        )
                return weight * largest
        except TensorFormatError as exc:
            raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None

    def _check_extra(self, state: Mapping[str, torch.Tensor]) -> None:
        if self._extra and self._extra.keys().isdisjoint(state):
            raise UpdateRejected(
                "INVALID_ARGUMENT",
                f"this federation's strategy needs {len(self._extra)} extra tensor(s) with every "
                f"update (such as {min(self._extra)!r}) and this update has none: the client "
                "does not run the strategy (update fedlink there)",
            )

    @staticmethod
    def _global_norm(phase: Phase) -> float:
        """The phase's global model's norm: known from when the engine wrote the model, else
        (a resumed model) read once. Two uploads may both read it: the same number either way."""
        if phase.global_norm is None:
            with open_state_file(phase.payload.path) as global_state:
                phase.global_norm = model_norm(global_state)
        return phase.global_norm

    def _check_codec(self, encoding: str) -> None:
        if encoding != self._codec.encoding:
            raise UpdateRejected(
                "INVALID_ARGUMENT",
                f"update encoding {encoding[:64]!r} is not allowed in this federation: it takes "
                f"{self._codec.encoding!r} (update_codec = {self._codec.describe()}); encode "
                "updates as the task header's update_codec says",
            )

    def _decode_update(self, phase: Phase, spool: Path) -> None:
        """Replace an encoded update on disk by the full model it stands for, so that every
        check and the strategy see plain tensors."""
        with open_state_file(spool) as payload, open_state_file(phase.payload.path) as base:
            state = decompress_update(self._codec, payload, base, self._manifest)
        save_state_file(state, spool, durable=False)

    def defer_result(self, upload: ResultUpload, error: StorageError) -> None:
        """The coordinator could not store the upload: drop it without blaming the client,
        which backs off and retries while the round is open (like an interrupted upload)."""
        self._spool.log_refusal(error)
        self._forget_upload(upload, "deferred")

    def reject_result(self, upload: ResultUpload, error: UpdateRejected) -> None:
        """The upload broke the protocol: drop this participant's result for the phase."""
        upload.close(keep=False)
        if upload.identity not in upload.phase.finished:
            self._reject(upload.phase, upload.identity, error)

    def abandon_result(self, upload: ResultUpload) -> None:
        """The client went away mid-upload: forget the partial upload. This is not misbehaviour,
        so the client may pull the task again and retry while the round is open."""
        self._forget_upload(upload, "interrupted")

    def _forget_upload(self, upload: ResultUpload, outcome: str) -> None:
        board = self._board
        upload.close(keep=False)
        board.metrics.updates.labels(upload.phase.kind.value, outcome).inc()
        with board.cond:
            if upload.identity not in upload.phase.finished:
                upload.phase.submitted.discard(upload.identity)
                board.roster.wake([upload.identity], time.monotonic())  # it may pull again
            board.cond.notify_all()

    def reject_participant(self, identity: str, error: UpdateRejected) -> None:
        """A participant broke the protocol (e.g. a result stream with no header): drop it from
        the current phase so it never holds up the round."""
        with self._board.cond:
            phase = self._board.phase
            if phase is None or identity not in phase.participants or identity in phase.finished:
                return
            phase.submitted.add(identity)
        self._reject(phase, identity, error)

    def _reject(self, phase: Phase, identity: str, error: UpdateRejected) -> None:
        board = self._board
        board.metrics.updates.labels(phase.kind.value, error.code).inc()
        if board.client_rows is not None:
            board.client_rows.rejected(phase, identity, str(error))
        board.status.result_rejected(identity, phase.round, phase.kind.value, str(error))
        with board.cond:
            phase.finished.add(identity)
            phase.rejected[identity] = str(error)
            board.cond.notify_all()


def _delete(path: Path) -> None:
    path.unlink(missing_ok=True)
