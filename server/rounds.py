"""The round engine: sample clients, hand out tasks, collect results, aggregate, evaluate.

Plain Python with no gRPC in it, so it can be driven directly in unit tests. The servicer calls
`join`, `touch`, `next_task`, `open_result` and `finish_result` from gRPC handler threads; `run`
drives the rounds from the coordinator's main thread. One lock and one condition variable guard
all shared state.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fedlink.common.errors import PayloadError, TensorFormatError, UpdateRejected
from fedlink.common.tensors import (
    Manifest,
    StateDict,
    manifest_of,
    open_state_file,
    save_state_file,
)
from fedlink.common.wire import JOIN_REQUIRED, PayloadAssembler, PayloadFile, PayloadInfo
from fedlink.server.aggregation import StreamingFedAvg
from fedlink.server.config import ServerConfig
from fedlink.server.validation import check_metrics, check_num_examples, check_update

log = logging.getLogger(__name__)

# A pull that finds nothing to do returns WAIT after this long, so idle streams are recycled.
LONG_POLL_SECONDS = 20.0
# Bytes a result payload may exceed the global model's own encoding by (header formatting).
PAYLOAD_SLACK_BYTES = 1 << 20


class TaskKind(enum.Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    WAIT = "wait"
    STOP = "stop"


@dataclass(frozen=True)
class TaskOffer:
    """What a pulling client receives: a header and, for train/evaluate, the global payload."""

    kind: TaskKind
    task_id: str = ""
    round: int = 0
    seed: int = 0
    payload: PayloadFile | None = None


@dataclass(frozen=True)
class ResultHeader:
    task_id: str
    round: int
    num_examples: int
    metrics: Mapping[str, float]
    payload: PayloadInfo | None


@dataclass
class _Phase:
    """One train or evaluate step of a round: who was asked, what came back."""

    kind: TaskKind
    round: int
    task_id: str
    participants: frozenset[str]
    payload: PayloadFile
    pending: set[str]
    submitted: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)
    open: bool = True
    aggregator: StreamingFedAvg | None = None
    metrics: list[tuple[int, Mapping[str, float]]] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)

    def done(self) -> bool:
        return self.finished >= self.participants


class ResultUpload:
    """One client's result in flight: header accepted, payload spooled to disk as it arrives."""

    def __init__(
        self, identity: str, header: ResultHeader, phase: _Phase, spool: Path | None, max_size: int
    ) -> None:
        self.identity = identity
        self.header = header
        self.phase = phase
        self.spool = spool
        self._file: BinaryIO | None = None
        self._assembler: PayloadAssembler | None = None
        if header.payload is not None and spool is not None:
            self._assembler = PayloadAssembler(header.payload, self, max_size=max_size)
            self._file = open(spool, "wb")  # noqa: SIM115 (closed in finish/discard)

    def write(self, data: bytes) -> int:
        assert self._file is not None
        return self._file.write(data)

    def add_chunk(self, offset: int, data: bytes) -> None:
        if self._assembler is None:
            raise UpdateRejected("INVALID_ARGUMENT", "this result takes no payload chunks")
        try:
            self._assembler.add(offset, data)
        except PayloadError as exc:
            raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None

    def complete_payload(self) -> None:
        if self._assembler is None:
            return
        assert self._file is not None
        self._file.close()
        try:
            self._assembler.finish()
        except PayloadError as exc:
            raise UpdateRejected("DATA_LOSS", str(exc)) from None

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
        if self.spool is not None:
            self.spool.unlink(missing_ok=True)


@dataclass
class RoundRecord:
    """One row of metrics.jsonl."""

    round: int
    clients_sampled: int
    clients_accepted: int
    rejected: dict[str, str]
    train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    federated_loss: float | None
    federated_accuracy: float | None
    seconds: float
    bytes_down: int
    bytes_up: int


@dataclass
class RunSummary:
    rounds_completed: int
    completed: bool
    stopped_by_signal: bool
    final_model: Path  # the last global model, a safetensors file in the state directory
    records: list[RoundRecord]


Evaluator = Callable[[StateDict], tuple[float, float] | None]
RoundListener = Callable[[RoundRecord], None]


@dataclass
class _ClientInfo:
    joined_at: float
    last_seen: float


class RoundEngine:
    def __init__(
        self,
        config: ServerConfig,
        initial_state: StateDict,
        *,
        evaluate_centrally: Evaluator | None = None,
        on_round: RoundListener | None = None,
    ) -> None:
        self._config = config
        self._manifest: Manifest = manifest_of(initial_state)
        self._evaluate_centrally = evaluate_centrally
        self._on_round = on_round
        self._spool_dir = config.state_dir / "incoming"
        self._spool_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._spool_dir.glob("*.part"):
            stale.unlink()
        self._global_files: list[PayloadFile] = []
        self._global = self._write_global(initial_state, round_number=0)
        self._cond = threading.Condition()
        self._clients: dict[str, _ClientInfo] = {}
        self._phase: _Phase | None = None
        self._stopping = False
        self._told_to_stop: set[str] = set()
        self._bytes_down = 0
        self._bytes_up = 0
        self._fold_lock = threading.Lock()

    # ---- called from gRPC handler threads -------------------------------------------------

    def join(self, identity: str) -> None:
        now = time.monotonic()
        with self._cond:
            info = self._clients.get(identity)
            if info is None:
                self._clients[identity] = _ClientInfo(joined_at=now, last_seen=now)
                log.info("client %s joined (%d connected)", identity, len(self._clients))
            else:
                info.last_seen = now
            self._cond.notify_all()

    def touch(self, identity: str) -> bool:
        """Record a sign of life; False when the client never joined."""
        with self._cond:
            info = self._clients.get(identity)
            if info is None:
                return False
            info.last_seen = time.monotonic()
            return True

    @property
    def active(self) -> bool:
        return not self._stopping

    def next_task(self, identity: str, timeout: float = LONG_POLL_SECONDS) -> TaskOffer:
        """Block until this client has a task, the federation stops, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if identity not in self._clients:
                raise UpdateRejected("FAILED_PRECONDITION", JOIN_REQUIRED)
            while True:
                self._clients[identity].last_seen = time.monotonic()
                if self._stopping:
                    self._told_to_stop.add(identity)
                    self._cond.notify_all()
                    return TaskOffer(TaskKind.STOP)
                phase = self._phase
                if phase is not None and phase.open and identity in phase.pending:
                    phase.pending.discard(identity)
                    return TaskOffer(
                        kind=phase.kind,
                        task_id=phase.task_id,
                        round=phase.round,
                        seed=self._client_seed(phase.round, identity),
                        payload=phase.payload,
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return TaskOffer(TaskKind.WAIT)
                self._cond.wait(remaining)

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
            if identity in phase.submitted:
                raise UpdateRejected(
                    "ALREADY_EXISTS",
                    f"{identity} already submitted a result for round {phase.round}",
                )
            phase.submitted.add(identity)
        try:
            check_num_examples(header.num_examples, self._config.max_num_examples)
            check_metrics(header.metrics)
            if phase.kind is TaskKind.TRAIN and header.payload is None:
                raise UpdateRejected("INVALID_ARGUMENT", "a training result must carry a payload")
            if phase.kind is TaskKind.EVALUATE and header.payload is not None:
                raise UpdateRejected("INVALID_ARGUMENT", "an evaluation result carries no payload")
            spool = None
            if header.payload is not None:
                spool = self._spool_dir / f"{uuid.uuid4().hex}.part"
            max_size = self._global.info.size + PAYLOAD_SLACK_BYTES
            try:
                return ResultUpload(identity, header, phase, spool, max_size)
            except PayloadError as exc:
                code = (
                    "RESOURCE_EXHAUSTED" if "exceeds the limit" in str(exc) else "INVALID_ARGUMENT"
                )
                raise UpdateRejected(code, str(exc)) from None
        except UpdateRejected as exc:
            self._mark_finished(phase, identity, rejected=str(exc))
            raise

    def finish_result(self, upload: ResultUpload) -> None:
        """Verify the complete payload, validate it, and fold it into the round's aggregate."""
        phase = upload.phase
        try:
            upload.complete_payload()
            if phase.kind is TaskKind.TRAIN:
                assert upload.spool is not None and phase.aggregator is not None
                # One fold at a time: the accumulator is shared, and a mapped update costs memory.
                with self._fold_lock:
                    if not phase.open:
                        raise UpdateRejected(
                            "DEADLINE_EXCEEDED",
                            f"round {phase.round} closed before the upload finished",
                        )
                    try:
                        with open_state_file(upload.spool) as state:
                            check_update(state, self._manifest)
                            phase.aggregator.add(state, float(upload.header.num_examples))
                    except TensorFormatError as exc:
                        raise UpdateRejected("INVALID_ARGUMENT", str(exc)) from None
            else:
                with self._cond:
                    if not phase.open:
                        raise UpdateRejected(
                            "DEADLINE_EXCEEDED",
                            f"round {phase.round} closed before the result arrived",
                        )
                    phase.metrics.append((upload.header.num_examples, dict(upload.header.metrics)))
        except UpdateRejected as exc:
            self._mark_finished(phase, upload.identity, rejected=str(exc))
            raise
        finally:
            upload.discard()
        with self._cond:
            if phase.kind is TaskKind.TRAIN:
                phase.metrics.append((upload.header.num_examples, dict(upload.header.metrics)))
        self._mark_finished(phase, upload.identity, rejected=None)
        log.debug(
            "accepted %s result from %s (round %d)", phase.kind.value, upload.identity, phase.round
        )

    def abandon_result(self, upload: ResultUpload, reason: str) -> None:
        """The upload failed or the client went away mid-upload: drop it from this phase."""
        upload.discard()
        if upload.identity not in upload.phase.finished:
            self._mark_finished(upload.phase, upload.identity, rejected=reason)

    def reject_participant(self, identity: str, reason: str) -> None:
        """A participant broke the protocol (e.g. a result stream with no header): drop it from
        the current phase so it never holds up the round."""
        with self._cond:
            phase = self._phase
            if phase is None or identity not in phase.participants or identity in phase.finished:
                return
            phase.submitted.add(identity)
        self._mark_finished(phase, identity, rejected=reason)

    def count_bytes(self, *, down: int = 0, up: int = 0) -> None:
        with self._cond:
            self._bytes_down += down
            self._bytes_up += up

    def request_stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # ---- the round loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> RunSummary:
        cfg = self._config
        records: list[RoundRecord] = []
        round_number = 1
        failures = 0
        try:
            while round_number <= cfg.num_rounds and not stop.is_set():
                sampled = self._sample(round_number, stop)
                if sampled is None:
                    break
                started = time.monotonic()
                self._reset_byte_counters()
                train = self._run_phase(TaskKind.TRAIN, round_number, sampled, stop)
                if train is None:
                    break
                accepted = train.aggregator.num_updates if train.aggregator else 0
                if accepted < cfg.min_results:
                    failures += 1
                    log.warning(
                        "round %d: %d of %d updates accepted, fewer than min_results=%d; "
                        "repeating the round (%d/%d)",
                        round_number,
                        accepted,
                        len(sampled),
                        cfg.min_results,
                        failures,
                        cfg.max_round_retries,
                    )
                    if failures > cfg.max_round_retries:
                        log.error(
                            "giving up after %d failed attempts at round %d", failures, round_number
                        )
                        break
                    continue
                failures = 0
                assert train.aggregator is not None
                state = train.aggregator.result()
                train.aggregator = None
                global_file = self._write_global(state, round_number)
                with self._cond:
                    self._global = global_file
                central = self._evaluate_centrally(state) if self._evaluate_centrally else None
                del state  # the serialized global model is the only copy kept between rounds
                federated: tuple[float, float] | None = None
                if cfg.evaluate_every and round_number % cfg.evaluate_every == 0:
                    evaluation = self._run_phase(TaskKind.EVALUATE, round_number, sampled, stop)
                    if evaluation is None:
                        break
                    federated = _weighted_eval(evaluation.metrics)
                record = RoundRecord(
                    round=round_number,
                    clients_sampled=len(sampled),
                    clients_accepted=accepted,
                    rejected=dict(train.rejected),
                    train_loss=_weighted_mean(train.metrics, "loss"),
                    test_loss=central[0] if central else None,
                    test_accuracy=central[1] if central else None,
                    federated_loss=federated[0] if federated else None,
                    federated_accuracy=federated[1] if federated else None,
                    seconds=time.monotonic() - started,
                    bytes_down=self._bytes_down,
                    bytes_up=self._bytes_up,
                )
                records.append(record)
                if self._on_round:
                    self._on_round(record)
                round_number += 1
        finally:
            self.request_stop()
        completed = len(records) == cfg.num_rounds
        return RunSummary(len(records), completed, stop.is_set(), self._global.path, records)

    def wait_for_stop_delivery(self, grace_seconds: float) -> None:
        """Give connected clients a moment to pull their STOP before the server goes away."""
        deadline = time.monotonic() + grace_seconds
        with self._cond:
            while set(self._alive_clients()) - self._told_to_stop:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    # ---- internals ----------------------------------------------------------------------------

    def _run_phase(
        self, kind: TaskKind, round_number: int, participants: list[str], stop: threading.Event
    ) -> _Phase | None:
        phase = _Phase(
            kind=kind,
            round=round_number,
            task_id=uuid.uuid4().hex,
            participants=frozenset(participants),
            payload=self._global,
            pending=set(participants),
            aggregator=StreamingFedAvg(self._manifest) if kind is TaskKind.TRAIN else None,
        )
        deadline = time.monotonic() + self._config.round_timeout_seconds
        with self._cond:
            self._phase = phase
            self._cond.notify_all()
            while not phase.done() and not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(phase.participants - phase.finished)
                    log.warning(
                        "round %d %s: deadline passed; no result from %s",
                        round_number,
                        kind.value,
                        ", ".join(missing),
                    )
                    break
                self._cond.wait(min(remaining, 0.5))
        # Closing under the fold lock waits for an in-progress fold and blocks later ones.
        with self._fold_lock, self._cond:
            phase.open = False
            self._phase = None
        if stop.is_set():
            return None
        for identity, reason in phase.rejected.items():
            log.warning(
                "round %d: rejected %s from %s: %s", round_number, kind.value, identity, reason
            )
        return phase

    def _mark_finished(self, phase: _Phase, identity: str, *, rejected: str | None) -> None:
        with self._cond:
            phase.finished.add(identity)
            if rejected is not None:
                phase.rejected[identity] = rejected
            self._cond.notify_all()

    def _sample(self, round_number: int, stop: threading.Event) -> list[str] | None:
        """Wait until enough clients are alive, then pick this round's participants (seeded)."""
        cfg = self._config
        needed = max(cfg.min_fit_clients, cfg.min_clients if round_number == 1 else 0)
        announced = False
        with self._cond:
            while not stop.is_set():
                alive = self._alive_clients()
                if len(alive) >= needed:
                    count = max(cfg.min_fit_clients, math.ceil(cfg.fraction_fit * len(alive)))
                    rng = random.Random(f"{cfg.seed}:{round_number}")
                    return sorted(rng.sample(alive, min(count, len(alive))))
                if not announced:
                    log.info("waiting for clients: %d of %d connected", len(alive), needed)
                    announced = True
                self._cond.wait(0.5)
        return None

    def _alive_clients(self) -> list[str]:
        window = 3 * self._config.heartbeat_interval_seconds + LONG_POLL_SECONDS
        now = time.monotonic()
        return sorted(i for i, c in self._clients.items() if now - c.last_seen <= window)

    def _client_seed(self, round_number: int, identity: str) -> int:
        digest = hashlib.sha256(f"{self._config.seed}:{round_number}:{identity}".encode()).digest()
        return int.from_bytes(digest[:8], "little") >> 1

    def _write_global(self, state: StateDict, round_number: int) -> PayloadFile:
        """Serialize the global model once per round; every download streams from this file.

        The previous file is kept (a download that started just before the switch may still be
        reading it); older ones are deleted.
        """
        path = self._config.state_dir / f"global-{round_number:06d}.safetensors"
        # A working copy for downloads; the published final model is the durable one.
        save_state_file(state, path, durable=False)
        payload = PayloadFile.seal(path)
        self._global_files.append(payload)
        while len(self._global_files) > 2:
            self._global_files.pop(0).path.unlink(missing_ok=True)
        return payload

    def _reset_byte_counters(self) -> None:
        with self._cond:
            self._bytes_down = 0
            self._bytes_up = 0


def _weighted_mean(results: list[tuple[int, Mapping[str, float]]], key: str) -> float | None:
    pairs = [(n, m[key]) for n, m in results if key in m]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def _weighted_eval(results: list[tuple[int, Mapping[str, float]]]) -> tuple[float, float] | None:
    loss = _weighted_mean(results, "loss")
    accuracy = _weighted_mean(results, "accuracy")
    if loss is None or accuracy is None:
        return None
    return loss, accuracy


__all__ = [
    "ResultHeader",
    "ResultUpload",
    "RoundEngine",
    "RoundRecord",
    "RunSummary",
    "TaskKind",
    "TaskOffer",
]
