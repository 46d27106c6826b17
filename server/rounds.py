"""The round engine: sample clients, hand out tasks, collect results, aggregate, evaluate.

Plain Python with no gRPC in it, so it can be driven directly in unit tests or in-process
(server/inprocess.py). The transport calls `join`, `touch`, `poll_task`, `open_result` and
`finish_result` from its event loop and workers; `run` drives the rounds from the coordinator's
main thread. One lock and one condition variable guard all shared state. What a round is made
of lives in phases.py, a result in flight in intake.py, secure aggregation's messages in
secure_rounds.py, the aggregation itself in strategy.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlink.common.codecs import decompress_update
from fedlink.common.errors import (
    PayloadError,
    SecAggError,
    StorageError,
    TensorFormatError,
    UpdateRejected,
)
from fedlink.common.fixedpoint import UpdateLayout
from fedlink.common.partial import federated_part
from fedlink.common.secagg import SecAggServer
from fedlink.common.secagg_wire import (
    SecAggStep,
)
from fedlink.common.tensors import (
    Manifest,
    StateDict,
    manifest_of,
    open_state_file,
    save_state_file,
)
from fedlink.common.wire import (
    ENCODING,
    JOIN_REQUIRED,
    PayloadFile,
)
from fedlink.server.aggregation import SUM_LIMIT, weighted_magnitude
from fedlink.server.checkpoints import Checkpoint, CheckpointStore, run_identity
from fedlink.server.config import ServerConfig
from fedlink.server.intake import ResultUpload, Spool
from fedlink.server.metrics import MetricAggregator, other_metrics
from fedlink.server.monitoring import CoordinatorMetrics
from fedlink.server.phases import (
    AcceptedUpdate,
    Phase,
    ResultHeader,
    RoundRecord,
    RunSummary,
    SecureSession,
    TaskKind,
    TaskOffer,
)
from fedlink.server.privacy import RoundPrivacy
from fedlink.server.roster import Roster, Wake
from fedlink.server.secure_rounds import (
    close_secure_step,
    secure_average,
    session_setup,
    take_secure_message,
)
from fedlink.server.status import RunStatus
from fedlink.server.strategy import aggregate_files, next_global
from fedlink.server.validation import (
    check_metrics,
    check_num_examples,
    check_update,
    check_update_bound,
    model_norm,
)

log = logging.getLogger(__name__)

# A pull that finds nothing to do returns WAIT after this long, so idle streams are recycled.
LONG_POLL_SECONDS = 20.0
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


@dataclass
class _Training:
    """What a round's training produced: the new global model, or None when the attempt fell
    short (fewer than min_results updates, or secure aggregation below its threshold)."""

    state: StateDict | None
    accepted: int
    answered: frozenset[str]  # participants that kept answering to the end
    rejected: dict[str, str]
    metrics: list[tuple[int, Mapping[str, float]]]


Evaluator = Callable[[StateDict], Mapping[str, float]]
RoundListener = Callable[[RoundRecord], None]


class RoundEngine:
    def __init__(
        self,
        config: ServerConfig,
        initial_state: StateDict,
        *,
        evaluate_centrally: Evaluator | None = None,
        on_round: RoundListener | None = None,
        resume_from: Checkpoint | None = None,
        aggregate_evaluation: MetricAggregator | None = None,
    ) -> None:
        self._config = config
        # A partial model: only the travelling tensors are the federation's global model.
        initial_state, self.frozen_sha256 = federated_part(
            config.tensor_selection(), initial_state, config.frozen_sha256
        )
        if self.frozen_sha256:
            log.info("frozen tensors: SHA-256 %s (clients must match)", self.frozen_sha256.hex())
        self._manifest: Manifest = manifest_of(initial_state)
        self._evaluate_centrally = evaluate_centrally
        self._aggregate_evaluation = aggregate_evaluation or MetricAggregator()
        self._on_round = on_round
        self.metrics = CoordinatorMetrics()
        self.metrics.count_clients_with(lambda: len(self._alive_clients()))
        self.status = RunStatus(config.num_rounds, config.liveness_timeout_seconds)
        self._checkpoints = CheckpointStore(config.state_dir, keep=config.keep_checkpoints)
        self._spool = Spool(config.state_dir / "incoming")
        self._layout = UpdateLayout(self._manifest)
        # Secure aggregation: advertised keys must be signed by their client's certificate.
        self._ca_pem = None if config.insecure or config.ca is None else config.ca.read_bytes()
        self._cond = threading.Condition()
        self._roster = Roster(config.liveness_timeout_seconds)
        self._phase: Phase | None = None
        self._stopping = False  # the run is over: clients are told to stop
        self._shutting_down = False  # this process is going away: clients retry elsewhen
        self._told_to_stop: set[str] = set()
        self._bytes_down = 0
        self._bytes_up = 0
        self._secure_lock = threading.Lock()  # secure aggregation's state takes one at a time
        self._large_validation = threading.Lock()
        self._strategy = config.build_strategy()
        self._codec = config.update_codec_spec()
        if not self._codec.plain:
            log.info("updates: %s (%s)", self._codec.describe(), self._codec.encoding)
        log.info("strategy: %r", self._strategy)
        if resume_from is not None:
            self._strategy.load_state_dict(resume_from.strategy_state)
        self._privacy = RoundPrivacy.for_run(config, resume_from)
        self.metrics.dp_epsilon.set(self._privacy.epsilon() if self._privacy else math.inf)
        if resume_from is None:
            self._completed_round = 0
            self._global = self._write_global(initial_state, round_number=0)
        else:
            self._completed_round = resume_from.round
            self._global = resume_from.model
            self._roster.known.update(resume_from.clients)
            self.metrics.current_round.set(resume_from.round)
            log.info(
                "resuming after round %d from %s (%d known clients)",
                resume_from.round,
                resume_from.model.path.name,
                len(resume_from.clients),
            )

    # ---- called from gRPC handler threads -------------------------------------------------

    def join(self, identity: str) -> None:
        with self._cond:
            if self._roster.join(identity, time.monotonic()):
                log.info("client %s joined (%d connected)", identity, self._roster.connected)
            self.status.client_joined(identity)
            self._cond.notify_all()

    def leave(self, identity: str, reason: str) -> None:
        """The client said it is going away: it is no longer alive, so the phase in progress
        closes without it (as if it had gone silent) and it is not sampled until it joins again.
        Forgotten from the known clients too, so `below_quorum = "wait"` does not wait for it."""
        with self._cond:
            if not self._roster.leave(identity):
                return
            self.status.client_left(identity, reason)
            log.warning(
                "client %s left (%d connected): %s", identity, self._roster.connected, reason
            )
            self._roster.wake(
                [identity], time.monotonic()
            )  # a poll it left waiting ends now (JOIN_REQUIRED)
            self._cond.notify_all()

    @property
    def manifest(self) -> Manifest:
        """Names, dtypes and shapes of the global model (fixed for the run)."""
        return self._manifest

    def touch(self, identity: str) -> bool:
        """Record a sign of life; False when the client has not joined this coordinator."""
        with self._cond:
            if not self._roster.seen(identity, time.monotonic()):
                return False
            self.status.client_seen(identity)
            return True

    @property
    def active(self) -> bool:
        return not (self._stopping or self._shutting_down)

    def poll_task(self, identity: str, wake: Wake | None = None) -> TaskOffer | None:
        """This client's task now, or None when it has nothing to do yet. With `wake`, and no
        task, `wake` is registered to be called (from any thread, once) when this client may have
        one: a phase it takes part in opened, the run stopped, or its interrupted upload may be
        retried. Only that client's waiters are woken, never every waiting poll."""
        with self._cond:
            if not self._roster.seen(identity, time.monotonic()):
                raise UpdateRejected("FAILED_PRECONDITION", JOIN_REQUIRED)
            self.status.client_seen(identity)
            if self._shutting_down:
                raise UpdateRejected(
                    "UNAVAILABLE", "the coordinator is shutting down; retry after it restarts"
                )
            if self._stopping:
                self._told_to_stop.add(identity)
                self._cond.notify_all()
                return TaskOffer(TaskKind.STOP)
            phase = self._phase
            if (
                phase is not None
                and phase.open
                and identity in phase.participants
                and identity not in phase.submitted
                and identity not in phase.finished
            ):
                if identity in phase.pulled:
                    log.info("round %d: handing the task to %s again", phase.round, identity)
                phase.pulled.add(identity)
                return TaskOffer(
                    kind=phase.kind,
                    task_id=phase.task_id,
                    round=phase.round,
                    seed=self._client_seed(phase.round, identity),
                    payload=phase.inboxes.get(identity, phase.payload),
                    secagg=phase.secure.setup if phase.secure else None,
                )
            if wake is not None:
                self._roster.add_waiter(identity, wake)
            return None

    def cancel_wake(self, identity: str, wake: Wake) -> None:
        """Forget a `wake` registered by poll_task (the poll ended without being woken)."""
        with self._cond:
            self._roster.remove_waiter(identity, wake)

    def next_task(self, identity: str, timeout: float = LONG_POLL_SECONDS) -> TaskOffer:
        """Block until this client has a task, the federation stops, or `timeout` passes (WAIT).
        For callers in a thread of their own (in-process drivers, tests); the gRPC servicer
        waits on `poll_task`'s wake-up without a thread."""
        deadline = time.monotonic() + timeout
        while True:
            ready = threading.Event()
            wake = ready.set
            offer = self.poll_task(identity, wake)
            if offer is not None:
                return offer
            woken = ready.wait(max(0.0, deadline - time.monotonic()))
            self.cancel_wake(identity, wake)
            if not woken:
                return TaskOffer(TaskKind.WAIT)

    def open_result(self, identity: str, header: ResultHeader) -> ResultUpload:
        """Check a result header before any payload byte is accepted."""
        with self._cond:
            phase = self._phase
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
            spool = None
            if header.payload is not None:
                spool = self._spool.directory / f"{uuid.uuid4().hex}.part"
            encoding, max_size = self._expected_payload(phase)
            reserved = 0
            if header.payload is not None and header.payload.size <= max_size:
                # The room the next global model and its checkpoint need is never handed out.
                keep_free = self._global.info.size + CHECKPOINT_ROOM_BYTES
                # An encoded update is decoded next to itself: room for the full model too.
                decoded = 0 if self._codec.plain else self._global.info.size
                reserved = self._spool.reserve(header.payload.size + decoded, keep_free)
            try:
                upload = ResultUpload(
                    identity,
                    header,
                    phase,
                    spool,
                    max_size=max_size,
                    encoding=encoding,
                    release=lambda: self._spool.release(reserved),
                )
            except (PayloadError, StorageError) as exc:
                self._spool.release(reserved)
                if isinstance(exc, StorageError):
                    raise
                code = (
                    "RESOURCE_EXHAUSTED" if "exceeds the limit" in str(exc) else "INVALID_ARGUMENT"
                )
                raise UpdateRejected(code, str(exc)) from None
        except UpdateRejected as exc:
            self._reject(phase, identity, exc)
            raise
        except StorageError:
            with self._cond:
                phase.submitted.discard(identity)  # not the client's fault: it may retry
            raise
        log.debug("receiving %s result from %s (round %d)", phase.kind.value, identity, phase.round)
        return upload

    def defer_result(self, upload: ResultUpload, error: StorageError) -> None:
        """The coordinator could not store the upload: drop it without blaming the client,
        which backs off and retries while the round is open (like an interrupted upload)."""
        self._spool.log_refusal(error)
        self._forget_upload(upload, "deferred")

    def _expected_payload(self, phase: Phase) -> tuple[str, int]:
        """The encoding and largest size of a result payload in `phase`."""
        if phase.secure is None and phase.kind is TaskKind.TRAIN and not self._codec.plain:
            return self._codec.encoding, self._codec.max_payload_bytes(self._manifest)
        if phase.secure is None:
            return ENCODING, self._global.info.size + PAYLOAD_SLACK_BYTES
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
        no engine lock held (validation reads a whole mapped update). Only secure aggregation's
        state, which is not thread-safe, takes its messages one at a time. A phase closes only
        once no result of it is being validated, so a result is either fully taken in before
        the phase closes, or refused."""
        phase = upload.phase
        accepted = False
        try:
            upload.complete_payload()
            with self._cond:
                if not phase.open:
                    raise UpdateRejected(
                        "DEADLINE_EXCEEDED",
                        f"round {phase.round} closed before the result arrived",
                    )
                phase.validating += 1
            try:
                magnitude = 0.0
                if phase.kind is TaskKind.TRAIN:
                    # A large model is validated one update at a time: each validation maps a
                    # whole update and the global model, and memory must stay O(model).
                    large = phase.payload.info.size > PARALLEL_VALIDATION_MAX_BYTES
                    with self._large_validation if large else contextlib.nullcontext():
                        magnitude = self._validate_update(phase, upload)
                if phase.secure is not None:
                    assert upload.spool is not None
                    with self._secure_lock:
                        take_secure_message(
                            phase.kind, phase.secure, upload.identity, upload.spool, self._ca_pem
                        )
                with self._cond:
                    if phase.kind is TaskKind.TRAIN:
                        assert upload.spool is not None
                        self._add_magnitude(phase, magnitude)
                        phase.accepted[upload.identity] = AcceptedUpdate(
                            float(upload.header.num_examples), upload.spool
                        )
                    if phase.secure is None:
                        phase.metrics.append(
                            (upload.header.num_examples, dict(upload.header.metrics))
                        )
                    phase.delivered.add(upload.identity)
                    phase.finished.add(upload.identity)
            finally:
                with self._cond:
                    phase.validating -= 1
                    self._cond.notify_all()
            accepted = True
        except UpdateRejected as exc:
            self._reject(phase, upload.identity, exc)
            raise
        finally:
            upload.close(keep=accepted and phase.kind is TaskKind.TRAIN)
        self.metrics.updates.labels(phase.kind.value, "accepted").inc()
        self.status.result_accepted(upload.identity, phase.round, phase.kind.value)
        log.debug(
            "accepted %s result from %s (round %d)", phase.kind.value, upload.identity, phase.round
        )

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
                check_update(state, self._manifest)
                if ratio > 0:
                    with open_state_file(phase.payload.path) as global_state:
                        if phase.global_norm is None:
                            # Two uploads may both measure it: the same number either way.
                            phase.global_norm = model_norm(global_state)
                        check_update_bound(
                            state, global_state, ratio=ratio, global_norm=phase.global_norm
                        )
                return weighted_magnitude(state, weight)
        except TensorFormatError as exc:
            raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None

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

    def _add_magnitude(self, phase: Phase, magnitude: float) -> None:
        """Refuse an update that could push the aggregate out of the finite range (checked
        whatever max_update_norm_ratio says); with the lock held."""
        if not phase.weighted_magnitude + magnitude <= SUM_LIMIT:
            raise UpdateRejected(
                "INVALID_ARGUMENT",
                f"update would make the aggregate non-finite: num_examples x its largest value "
                f"= {magnitude:.3g}",
            )
        phase.weighted_magnitude += magnitude

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
        upload.close(keep=False)
        self.metrics.updates.labels(upload.phase.kind.value, outcome).inc()
        with self._cond:
            if upload.identity not in upload.phase.finished:
                upload.phase.submitted.discard(upload.identity)
                self._roster.wake([upload.identity], time.monotonic())  # it may pull the task again
            self._cond.notify_all()

    def reject_participant(self, identity: str, error: UpdateRejected) -> None:
        """A participant broke the protocol (e.g. a result stream with no header): drop it from
        the current phase so it never holds up the round."""
        with self._cond:
            phase = self._phase
            if phase is None or identity not in phase.participants or identity in phase.finished:
                return
            phase.submitted.add(identity)
        self._reject(phase, identity, error)

    def count_bytes(self, *, down: int = 0, up: int = 0) -> None:
        with self._cond:
            self._bytes_down += down
            self._bytes_up += up
        self.metrics.bytes_sent.inc(down)
        self.metrics.bytes_received.inc(up)

    def request_stop(self) -> None:
        """The run is over: every client that pulls is told to stop."""
        with self._cond:
            self._stopping = True
            self._roster.wake(now=time.monotonic())
            self._cond.notify_all()

    # ---- the round loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> RunSummary:
        """Run rounds until `num_rounds` are complete, the run fails, or `stop` is set (a signal:
        the process is going away, so clients are not told to stop and will retry)."""
        cfg = self._config
        last_record: RoundRecord | None = None
        round_number = self._completed_round + 1
        failures = 0
        avoid: frozenset[str] = frozenset()
        budget_spent = False
        storage_failure: str | None = None
        try:
            while round_number <= cfg.num_rounds and not stop.is_set():
                if self._privacy and self._privacy.budget_would_be_exceeded(round_number):
                    budget_spent = True
                    break
                sampled = self._sample(round_number, failures, avoid, stop)
                if sampled is None:
                    break
                self.metrics.current_round.set(round_number)
                started = time.monotonic()
                self._reset_byte_counters()
                if cfg.secure_aggregation:
                    train = self._train_securely(round_number, sampled, stop)
                else:
                    train = self._train_plainly(round_number, sampled, stop)
                if train is None:
                    break
                if train.state is not None:
                    train.state = next_global(
                        self._strategy, self._global.path, train.state, round_number
                    )
                if train.state is None:
                    failures += 1
                    avoid = frozenset(sampled) - train.answered
                    log.warning(
                        "round %d: repeating the round with other clients where possible (%d/%d)",
                        round_number,
                        failures,
                        cfg.max_round_retries,
                    )
                    if failures > cfg.max_round_retries:
                        log.error(
                            "giving up after %d failed attempts at round %d", failures, round_number
                        )
                        break
                    continue
                failures, avoid = 0, frozenset()
                # The model is held only by `state` from here, so `del state` below frees it.
                state, train.state = train.state, None
                epsilon = None
                if self._privacy is not None:
                    epsilon = self._privacy.account_round()
                    self.metrics.dp_epsilon.set(epsilon)
                global_file = self._write_global(state, round_number)
                with self._cond:
                    self._global = global_file
                central = self._evaluate_centrally(state) if self._evaluate_centrally else {}
                del state  # the serialized global model is the only copy kept between rounds
                federated: Mapping[str, float] = {}
                if cfg.evaluate_every and round_number % cfg.evaluate_every == 0:
                    evaluation = self._run_phase(
                        self._new_phase(TaskKind.EVALUATE, round_number, sampled),
                        self._config.round_timeout_seconds,
                        stop,
                    )
                    if evaluation is None:
                        break
                    by_strategy = self._strategy.aggregate_evaluate(evaluation.metrics)
                    federated = (  # None: the strategy leaves it to the task's aggregation
                        self._aggregate_evaluation(evaluation.metrics)
                        if by_strategy is None
                        else by_strategy
                    )
                record = RoundRecord(
                    round=round_number,
                    clients_sampled=len(sampled),
                    clients_accepted=train.accepted,
                    rejected=dict(train.rejected),
                    train_loss=_weighted_mean(train.metrics, "loss"),
                    test_loss=central.get("loss"),
                    test_accuracy=central.get("accuracy"),
                    federated_loss=federated.get("loss"),
                    federated_accuracy=federated.get("accuracy"),
                    seconds=time.monotonic() - started,
                    bytes_down=self._bytes_down,
                    bytes_up=self._bytes_up,
                    epsilon=epsilon,
                    dpsgd_epsilon=_largest(train.metrics, "dpsgd_epsilon"),
                    test_metrics=other_metrics(central),
                    federated_metrics=other_metrics(federated),
                )
                self._checkpoint(global_file, record)
                last_record = record
                self.metrics.rounds_completed.inc()
                self.metrics.round_duration.observe(record.seconds)
                if self._on_round:
                    self._on_round(record)
                round_number += 1
        except OSError as exc:  # StorageError included: a model, checkpoint or spool file
            storage_failure = str(exc)
            log.error(
                "the coordinator cannot use its state directory %s (%s); stopping in round %d. "
                "The last good checkpoint (round %d) stays in place: free space or fix the disk, "
                "then start the coordinator again to resume.",
                cfg.state_dir,
                exc,
                round_number,
                self._completed_round,
            )
        finally:
            # Clients are told the federation finished only when it did: after a signal or a
            # storage failure they retry until the coordinator is back.
            if stop.is_set() or storage_failure is not None:
                with self._cond:
                    self._shutting_down = True
                    self._roster.wake(now=time.monotonic())
                    self._cond.notify_all()
            else:
                self.request_stop()
        return RunSummary(
            rounds_completed=self._completed_round,
            completed=self._completed_round >= cfg.num_rounds,
            stopped_by_signal=stop.is_set(),
            final_model=self._global.path,
            last_record=last_record,
            budget_spent=budget_spent,
            storage_failure=storage_failure,
        )

    def tell_finished(self, identity: str) -> bool:
        """Whether the run is over; if it is, `identity` (joining now) counts as told so."""
        with self._cond:
            if not self._stopping:
                return False
            log.info("%s joined after the run finished; it is told so", identity)
            self._told_to_stop.add(identity)
            self._cond.notify_all()
            return True

    def wait_for_stop_delivery(
        self, grace_seconds: float, stop: threading.Event | None = None
    ) -> None:
        """Keep telling clients the run is finished (at Join and PullTask) until each one it
        waits for has been told, `grace_seconds` pass, or `stop` is set. It waits for the live
        clients and for every known client this process has not heard from (restored from the
        checkpoint): a coordinator started again on a finished run stays up until the clients
        of that run, started again with it, have learned that it is over and can exit 0."""
        deadline = time.monotonic() + grace_seconds
        with self._cond:
            while self._stopping and self._not_told_finished():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (stop is not None and stop.is_set()):
                    return
                self._cond.wait(min(remaining, 0.5))

    def _not_told_finished(self) -> set[str]:
        waiting = set(self._alive_clients())
        if not self._config.insecure:  # insecure identities are new on every connection
            waiting |= self._roster.known - self._roster.joined()
        return waiting - self._told_to_stop

    # ---- internals ----------------------------------------------------------------------------

    def _new_phase(
        self, kind: TaskKind, round_number: int, participants: list[str], **details: Any
    ) -> Phase:
        return Phase(
            kind=kind,
            round=round_number,
            task_id=details.pop("task_id", uuid.uuid4().hex),
            participants=frozenset(participants),
            payload=details.pop("payload", self._global),
            **details,
        )

    def _train_plainly(
        self, round_number: int, sampled: list[str], stop: threading.Event
    ) -> _Training | None:
        cfg = self._config
        train = self._run_phase(
            self._new_phase(TaskKind.TRAIN, round_number, sampled, quorum=cfg.min_results),
            cfg.round_timeout_seconds,
            stop,
        )
        if train is None:
            return None
        accepted = len(train.accepted)
        state = None
        if accepted >= cfg.min_results:
            state = self._aggregate(train)
        else:
            self._discard_updates(train)
            log.warning(
                "round %d: %d of %d updates accepted, fewer than min_results=%d",
                round_number,
                accepted,
                len(sampled),
                cfg.min_results,
            )
        return _Training(
            state, accepted, frozenset(train.finished), dict(train.rejected), train.metrics
        )

    def _train_securely(
        self, round_number: int, sampled: list[str], stop: threading.Event
    ) -> _Training | None:
        """One attempt at a round under secure aggregation: five phases, each with the clients
        that completed the previous one, then the unmasked sum decoded into the new model.

        The threshold t is a strict majority of the clients sampled (and at least min_results):
        the clients themselves refuse a smaller one, since two disjoint groups of t clients
        could then be told different stories about who dropped out.
        """
        cfg = self._config
        threshold = max(2, cfg.min_results, len(sampled) // 2 + 1)
        session = uuid.uuid4().hex
        setup = session_setup(self._config, self._layout, session, threshold, len(sampled))
        directory = self._spool.directory / f"secagg-{session}"
        directory.mkdir()
        secure = SecureSession(setup, SecAggServer(setup.params), directory)
        step_timeout = cfg.secagg_step_timeout_seconds
        rejected: dict[str, str] = {}
        answered = frozenset(sampled)
        try:
            steps = (
                (TaskKind.SECAGG_ADVERTISE, cfg.round_timeout_seconds),
                (TaskKind.SECAGG_SHARE_KEYS, step_timeout),
                (TaskKind.SECAGG_MASKED_INPUT, step_timeout),
                (TaskKind.SECAGG_CONSISTENCY, step_timeout),
                (TaskKind.SECAGG_UNMASK, step_timeout),
            )
            details: dict[str, Any] = {"task_id": session}
            for kind, timeout in steps:
                participants = sorted(answered)
                phase = self._run_phase(
                    self._new_phase(
                        kind,
                        round_number,
                        participants,
                        quorum=threshold,
                        secure=secure,
                        **details,
                    ),
                    timeout,
                    stop,
                )
                if phase is None:
                    return None
                rejected.update(phase.rejected)
                answered = frozenset(phase.delivered)
                details = close_secure_step(kind, secure, answered, self._global)
            survivors = len(participants)  # unmasking's: those whose masked input is summed
            total = secure.server.result()
            for culprit in secure.server.corrupt_responders:
                rejected[culprit] = "sent corrupted unmasking shares; unmasked without them"
                log.warning(
                    "round %d: %s sent corrupted unmasking shares; the sum was unmasked with "
                    "the other survivors' shares",
                    round_number,
                    culprit,
                )
        except SecAggError as exc:
            log.warning("round %d: secure aggregation failed: %s", round_number, exc)
            return _Training(None, 0, answered, rejected, [])
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        graph, k = secure.server.graph, setup.params.neighbours
        sparse = (
            f"; SecAgg+: {k} neighbours each, {graph.share_threshold} of a client's {k + 1} "
            "holders rebuild its secrets"
            if graph is not None and graph.sparse
            else ""
        )
        log.info(
            "round %d: secure aggregation recovered the sum of %d of %d clients (threshold %d%s)",
            round_number,
            survivors,
            len(sampled),
            threshold,
            sparse,
        )
        average = secure_average(total, setup, self._layout, self._global.path)
        return _Training(average, survivors, answered, rejected, [])

    def _run_phase(self, phase: Phase, timeout: float, stop: threading.Event) -> Phase | None:
        deadline = time.monotonic() + timeout
        kind, round_number = phase.kind, phase.round
        with self._cond:
            self._phase = phase
            self._roster.wake(phase.participants, time.monotonic())
            self.status.phase_opened(
                kind.value, round_number, timeout, phase.quorum, phase.participants
            )
            self._cond.notify_all()
            while not stop.is_set() and not self._can_close(phase, deadline):
                self._cond.wait(0.5)
        # An upload that is being validated finishes first; none starts once the phase closed.
        with self._cond:
            while phase.validating:
                self._cond.wait(0.5)
            phase.open = False
            self._phase = None
            self.status.phase_closed()
        if stop.is_set():
            self._discard_updates(phase)
            return None
        for identity, reason in phase.rejected.items():
            log.warning(
                "round %d: rejected %s from %s: %s", round_number, kind.value, identity, reason
            )
        return phase

    def _can_close(self, phase: Phase, deadline: float) -> bool:
        """Whether the phase has all it will get (called with the lock held).

        Every participant has answered; or the deadline passed; or everyone still missing is
        gone (silent past the liveness timeout, no upload in flight). Under
        `below_quorum = "wait"` a training phase short of its quorum stays open regardless.
        """
        if phase.done():
            return True
        quorum_met = self._config.below_quorum == "retry" or len(phase.delivered) >= phase.quorum
        missing = sorted(phase.participants - phase.finished)
        if time.monotonic() >= deadline:
            if quorum_met:
                log.warning(
                    "round %d %s: deadline passed; no result from %s",
                    phase.round,
                    phase.kind.value,
                    _names(missing),
                )
                return True
            if not phase.overdue_logged:
                log.warning(
                    "round %d %s: deadline passed with %d of %d results needed; waiting for %s",
                    phase.round,
                    phase.kind.value,
                    len(phase.delivered),
                    phase.quorum,
                    _names(missing),
                )
                phase.overdue_logged = True
            return False
        now = time.monotonic()  # only the missing are checked: O(missing) per result, not O(all)
        gone = [
            i for i in missing if i not in phase.submitted and not self._roster.is_alive(i, now)
        ]
        if quorum_met and len(gone) == len(missing):
            log.warning(
                "round %d %s: closing early, no sign of life from %s",
                phase.round,
                phase.kind.value,
                _names(gone),
            )
            return True
        return False

    def _reject(self, phase: Phase, identity: str, error: UpdateRejected) -> None:
        self.metrics.updates.labels(phase.kind.value, error.code).inc()
        self.status.result_rejected(identity, phase.round, phase.kind.value, str(error))
        with self._cond:
            phase.finished.add(identity)
            phase.rejected[identity] = str(error)
            self._cond.notify_all()

    def _aggregate(self, phase: Phase) -> StateDict:
        """The new global model from the accepted updates, taken in order of client identity.

        A fixed order makes floating-point sums, and so the new model, the same whatever order
        the uploads arrived in: that is what lets a seeded run be reproduced bit for bit. A
        streaming strategy (FedAvg) folds one memory-mapped update at a time, so memory stays one
        accumulator; the robust rules need every update (mapped, read slice by slice).
        """
        updates = [phase.accepted[identity] for identity in sorted(phase.accepted)]
        try:
            return aggregate_files(
                self._strategy,
                phase.payload.path,
                [(u.weight, u.spool) for u in updates],
                self._manifest,
            )
        finally:
            self._discard_updates(phase)

    def _discard_updates(self, phase: Phase) -> None:
        for update in phase.accepted.values():
            update.spool.unlink(missing_ok=True)

    def _sample(
        self, round_number: int, attempt: int, avoid: frozenset[str], stop: threading.Event
    ) -> list[str] | None:
        """Wait until enough clients are available, then pick this round's participants.

        "retry" samples among live clients, avoiding those that failed the previous attempt
        when enough others are available; "wait" samples among every client that has joined,
        so a crash does not change who takes part (a reproducible run depends on that). The
        choice is seeded by (seed, round, attempt).
        """
        cfg = self._config
        needed = max(cfg.min_fit_clients, cfg.min_clients if round_number == 1 else 0)
        announced = -1  # the population size last logged: one line whenever it changes
        self.status.waiting_for_clients(round_number, needed)
        with self._cond:
            while not stop.is_set():
                if cfg.below_quorum == "wait":
                    population = sorted(self._roster.known)
                else:
                    population = self._alive_clients()
                if len(population) >= needed:
                    others = [c for c in population if c not in avoid]
                    if len(others) >= cfg.min_fit_clients:
                        population = others
                    count = max(cfg.min_fit_clients, math.ceil(cfg.fraction_fit * len(population)))
                    rng = random.Random(f"{cfg.seed}:{round_number}:{attempt}")
                    return sorted(rng.sample(population, min(count, len(population))))
                if len(population) != announced:
                    log.info(
                        "round %d: waiting for %d more client(s) (%d of %d connected)",
                        round_number,
                        needed - len(population),
                        len(population),
                        needed,
                    )
                    announced = len(population)
                # Every join notifies the condition: count again at most 4 times a second, not
                # once per join (10,000 joins each sorting every session under the lock).
                recount = time.monotonic() + 0.25
                while not stop.is_set() and (left := recount - time.monotonic()) > 0:
                    self._cond.wait(left)
        return None

    def _alive_clients(self) -> list[str]:
        return self._roster.alive(time.monotonic())

    def _client_seed(self, round_number: int, identity: str) -> int:
        digest = hashlib.sha256(f"{self._config.seed}:{round_number}:{identity}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def _write_global(self, state: StateDict, round_number: int) -> PayloadFile:
        """Serialize the global model once per round, durably: every download streams from this
        file, and the round's checkpoint refers to it."""
        path = self._config.state_dir / f"global-{round_number:06d}.safetensors"
        save_state_file(state, path, durable=True)
        return PayloadFile.seal(path)

    def _checkpoint(self, global_file: PayloadFile, record: RoundRecord) -> None:
        with self._cond:
            clients = tuple(sorted(self._roster.known))
        self._checkpoints.save(
            Checkpoint(
                round=record.round,
                model=global_file,
                clients=clients,
                record=dataclasses.asdict(record),
                run=run_identity(self._config),
                privacy=self._privacy.history if self._privacy else (),
                strategy_state=self._strategy.state_dict(),
            )
        )
        self._completed_round = record.round
        # Keep the models that retained checkpoints name, plus the previous round's (a download
        # that started just before the switch may still be reading it).
        keep = {*self._checkpoints.retained_rounds(), record.round - 1}
        for path in self._config.state_dir.glob("global-*.safetensors"):
            number = path.name.removeprefix("global-").removesuffix(".safetensors")
            if number.isdigit() and int(number) not in keep:
                path.unlink(missing_ok=True)

    def _reset_byte_counters(self) -> None:
        with self._cond:
            self._bytes_down = 0
            self._bytes_up = 0


def _names(identities: list[str], shown: int = 10) -> str:
    """Identities for a log line: the first `shown`, then how many more (a round of 10,000
    clients must not write 100 KB lines)."""
    more = len(identities) - shown
    return ", ".join(identities[:shown]) + (f" and {more} more" if more > 0 else "")


def _weighted_mean(results: list[tuple[int, Mapping[str, float]]], key: str) -> float | None:
    pairs = [(n, m[key]) for n, m in results if key in m]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def _largest(results: list[tuple[int, Mapping[str, float]]], key: str) -> float | None:
    values = [m[key] for _, m in results if key in m]
    return max(values) if values else None


__all__ = [
    "ResultHeader",
    "ResultUpload",
    "RoundEngine",
    "RoundRecord",
    "RunSummary",
    "TaskKind",
    "TaskOffer",
]
