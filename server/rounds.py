"""The run loop: rounds one after another, each sampled, trained, aggregated, evaluated and
checkpointed.

Plain Python with no gRPC in it, so it can be driven directly in unit tests or in-process
(server/inprocess.py). `RoundEngine` builds the pieces and runs the rounds from the
coordinator's main thread; the transport talks to two of them: `engine.board`, the phase
machine clients' joins and polls go to (board.py), and `engine.results`, where their results
go (results.py). What a round is made of lives in phases.py, secure aggregation's steps in
secure_rounds.py, the aggregation itself in strategy.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from fedlink.common.fixedpoint import UpdateLayout
from fedlink.common.partial import federated_part
from fedlink.common.storage import make_durable
from fedlink.common.tensors import (
    Manifest,
    StateDict,
    manifest_of,
    state_payload,
    write_payload_file,
)
from fedlink.common.wire import PayloadFile
from fedlink.server.board import PhaseBoard
from fedlink.server.checkpoints import Checkpoint, CheckpointStore, run_identity
from fedlink.server.client_rows import ClientRows
from fedlink.server.config import ServerConfig
from fedlink.server.intake import Spool
from fedlink.server.metrics import MetricAggregator, other_metrics
from fedlink.server.monitoring import CoordinatorMetrics
from fedlink.server.phases import (
    Phase,
    RoundRecord,
    RunSummary,
    TaskKind,
    Training,
)
from fedlink.server.privacy import RoundPrivacy
from fedlink.server.results import CHECKPOINT_ROOM_BYTES, ResultIntake
from fedlink.server.secure_rounds import train_securely
from fedlink.server.status import RunStatus
from fedlink.server.strategy import aggregate_files, next_global
from fedlink.server.strategy_extras import StrategyExtras
from fedlink.server.validation import model_norm

log = logging.getLogger(__name__)

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
        client_rows: ClientRows | None = None,
    ) -> None:
        self._config = config
        # A partial model: only the travelling tensors are the federation's global model.
        initial_state, self.frozen_sha256 = federated_part(
            config.tensor_selection(), initial_state, config.frozen_sha256
        )
        if self.frozen_sha256:
            log.info("frozen tensors: SHA-256 %s (clients must match)", self.frozen_sha256.hex())
        self.manifest: Manifest = manifest_of(initial_state)  # fixed for the run
        self._evaluate_centrally = evaluate_centrally
        self._aggregate_evaluation = aggregate_evaluation or MetricAggregator()
        self._on_round = on_round
        self.metrics = CoordinatorMetrics()
        self.status = RunStatus(config.num_rounds, config.liveness_timeout_seconds)
        self.board = PhaseBoard(config, self.status, self.metrics, client_rows)
        self.metrics.count_clients_with(lambda: len(self.board.alive_clients()))
        self._checkpoints = CheckpointStore(config.state_dir, keep=config.keep_checkpoints)
        self._spool = Spool(config.state_dir / "incoming")
        self._strategy = config.build_strategy()
        log.info("strategy: %r", self._strategy)
        # The task's settings and the strategy's, sent with every task that runs the task's code.
        self.task_settings = config.task_settings(self._strategy)
        if resume_from is not None:
            self._strategy.load_state_dict(resume_from.strategy_state)
        self._extras = StrategyExtras(self._strategy, self.manifest, config.state_dir)
        self.results = ResultIntake(
            config, self.board, self._spool, self.manifest, self._current, self._extras.upload
        )
        self._layout = UpdateLayout(self.manifest)
        self._privacy = RoundPrivacy.for_run(config, resume_from)
        self.metrics.dp_epsilon.set(self._privacy.epsilon() if self._privacy else math.inf)
        # The global models written by this run (to tell whether a stream still reads one), and
        # a retired one that the next is written into (_retire_global).
        self._published: dict[Path, weakref.ref[PayloadFile]] = {}
        self._spare_global = config.state_dir / "global-spare.part"
        self._spare_global.unlink(missing_ok=True)
        # The L2 norm of the current global model when this run wrote it, taken from memory as
        # it was written (None: a resumed model, measured by the first verdict): the bound on
        # updates needs it, and reading it back would delay the round's first verdict (0.1 s
        # for a 1 GiB model). Set by `_write_global`, whose model always becomes `_global`.
        self._global_norm: float | None = None
        # A round's checkpoint is made durable on this thread while the next round begins: on
        # a 1 GiB model, syncing the model file alone kept clients waiting 0.3 s a round (a slow
        # disk, seconds). A round counts as completed once its checkpoint is on disk.
        self._persisting: ThreadPoolExecutor | None = None  # while `run` runs
        self._persisted: Future[None] | None = None
        if resume_from is None:
            self._completed_round = 0
            self._global = self._write_global(initial_state, round_number=0)
        else:
            self._completed_round = resume_from.round
            self._global = resume_from.model
            self.board.roster.known.update(resume_from.clients)
            self.metrics.current_round.set(resume_from.round)
            log.info(
                "resuming after round %d from %s (%d known clients)",
                resume_from.round,
                resume_from.model.path.name,
                len(resume_from.clients),
            )

    def _current(self) -> PayloadFile:
        with self.board.cond:
            return self._global

    def request_stop(self) -> None:
        """The run is over: every client that pulls is told to stop."""
        self.board.request_stop()

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
        self._persisting = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        try:
            while round_number <= cfg.num_rounds and not stop.is_set():
                if self._privacy and self._privacy.budget_would_be_exceeded(round_number):
                    budget_spent = True
                    break
                sampled = self.board.sample(round_number, failures, avoid, stop)
                if sampled is None:
                    break
                self.metrics.current_round.set(round_number)
                started = time.monotonic()
                self.board.take_byte_counts()  # this round's traffic from here
                if cfg.secure_aggregation:
                    train = train_securely(
                        self.board,
                        cfg,
                        self._layout,
                        self._spool.directory,
                        self._global,
                        round_number,
                        sampled,
                        stop,
                    )
                else:
                    train = self._train_plainly(round_number, sampled, stop)
                if train is None:
                    break
                if train.state is not None:
                    train.state = next_global(
                        self._strategy, self._global.path, train.state, round_number
                    )
                if train.state is None:
                    self._close_client_rows(completed=False)
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
                with self.board.cond:
                    self._global = global_file
                central = self._evaluate_centrally(state) if self._evaluate_centrally else {}
                # The serialized global model is the only copy kept between rounds; the memory
                # may back the strategy's next sums.
                self._strategy.release(state)
                del state
                federated: Mapping[str, float] = {}
                if cfg.evaluate_every and round_number % cfg.evaluate_every == 0:
                    evaluation = self.board.run_phase(
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
                bytes_down, bytes_up = self.board.take_byte_counts()
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
                    bytes_down=bytes_down,
                    bytes_up=bytes_up,
                    epsilon=epsilon,
                    dpsgd_epsilon=_largest(train.metrics, "dpsgd_epsilon"),
                    test_metrics=other_metrics(central),
                    federated_metrics=other_metrics(federated),
                )
                self._checkpoint(global_file, record)
                self._close_client_rows(completed=True)
                last_record = record
                self.metrics.rounds_completed.inc()
                self.metrics.round_duration.observe(record.seconds)
                round_number += 1
            self._wait_for_checkpoint()
        except OSError as exc:  # StorageError included: a model, checkpoint or spool file
            storage_failure = str(exc)
            # A checkpoint still being written completes (or fails) first: the round that
            # stops is the one after the last checkpoint on disk.
            self._persisting.shutdown(wait=True)
            log.error(
                "the coordinator cannot use its state directory %s (%s); stopping in round %d. "
                "The last good checkpoint (round %d) stays in place: free space or fix the disk, "
                "then start the coordinator again to resume.",
                cfg.state_dir,
                exc,
                self._completed_round + 1,
                self._completed_round,
            )
        finally:
            self._persisting.shutdown(wait=True)  # a checkpoint being written completes
            self._persisted = None
            self._extras.remove_task_payloads()
            self._spool.stop_recycling()
            self._spare_global.unlink(missing_ok=True)
            # Clients are told the federation finished only when it did: after a signal or a
            # storage failure they retry until the coordinator is back.
            if stop.is_set() or storage_failure is not None:
                self.board.shut_down()
            else:
                self.board.request_stop()
        return RunSummary(
            rounds_completed=self._completed_round,
            completed=self._completed_round >= cfg.num_rounds,
            stopped_by_signal=stop.is_set(),
            final_model=self._global.path,
            last_record=last_record,
            budget_spent=budget_spent,
            storage_failure=storage_failure,
        )

    # ---- internals ----------------------------------------------------------------------------

    def _new_phase(
        self, kind: TaskKind, round_number: int, participants: list[str], quorum: int = 0
    ) -> Phase:
        return Phase(
            kind=kind,
            round=round_number,
            task_id=uuid.uuid4().hex,
            participants=frozenset(participants),
            payload=self._global,
            quorum=quorum,
            global_norm=self._global_norm,
        )

    def _train_plainly(
        self, round_number: int, sampled: list[str], stop: threading.Event
    ) -> Training | None:
        cfg = self._config
        phase = self._new_phase(TaskKind.TRAIN, round_number, sampled, quorum=cfg.min_results)
        phase.download = self._extras.task_payload(self._global, round_number)
        train = self.board.run_phase(phase, cfg.round_timeout_seconds, stop)
        if train is None:
            self._discard_updates(phase)
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
        return Training(
            state, accepted, frozenset(train.finished), dict(train.rejected), train.metrics
        )

    def _aggregate(self, phase: Phase) -> StateDict:
        """The new global model from the accepted updates, taken in order of client identity.

        A fixed order makes floating-point sums, and so the new model, the same whatever order
        the uploads arrived in: that is what lets a seeded run be reproduced bit for bit. A
        streaming strategy (FedAvg) folds one memory-mapped update at a time, so memory stays one
        accumulator; the robust rules need every update (mapped, read slice by slice).
        """
        updates = [phase.accepted[identity] for identity in sorted(phase.accepted)]
        self._strategy.set_population(len(self.board.known_clients()))
        try:
            return aggregate_files(
                self._strategy,
                phase.payload.path,
                [(u.weight, u.spool) for u in updates],
                self.manifest,
            )
        finally:
            self._discard_updates(phase)

    def _discard_updates(self, phase: Phase) -> None:
        for update in phase.accepted.values():
            self._spool.recycle(update.spool)

    def _write_global(self, state: StateDict, round_number: int) -> PayloadFile:
        """Serialize the global model once per round: every download streams from this file,
        and the round's checkpoint refers to it (synced to disk before that, in `_persist`)."""
        # The last checkpoint is on disk, and the model file it retired is free to rewrite.
        self._wait_for_checkpoint()
        path = self._config.state_dir / f"global-{round_number:06d}.safetensors"
        payload = state_payload(state)
        # Recycled upload files give way to the model and its checkpoint.
        self._spool.make_room(payload.size + CHECKPOINT_ROOM_BYTES)
        # Hashed (and its norm taken) from memory, with no second read of the file, on another
        # core while the file is written: on a 1 GiB model that takes half a second off every
        # round.
        with ThreadPoolExecutor(1, thread_name_prefix="global-digest") as hashing:
            info = hashing.submit(lambda: payload.info)
            norm = hashing.submit(model_norm, state) if self._config.max_update_norm_ratio else None
            # Synced by the checkpoint that names it (_persist), off the round's path.
            write_payload_file(payload, path, durable=False, reuse=self._spare_global)
            written = PayloadFile(path, info.result())
            self._global_norm = None if norm is None else norm.result()
        self._published[path] = weakref.ref(written)
        return written

    def _checkpoint(self, global_file: PayloadFile, record: RoundRecord) -> None:
        """Checkpoint the round: what the next round changes is taken now (the strategy's
        state written, the rest copied); the model file is synced, the checkpoint committed
        and the round reported (`on_round`) on the checkpoint thread (`_persist`) while the next
        round runs."""
        checkpoint = Checkpoint(
            round=record.round,
            model=global_file,
            clients=self.board.known_clients(),
            record=dataclasses.asdict(record),
            run=run_identity(self._config),
            privacy=self._privacy.history if self._privacy else (),
            strategy_state=self._strategy.state_dict(),
        )
        strategy_file = self._checkpoints.save_strategy_state(checkpoint)
        checkpoint = dataclasses.replace(checkpoint, strategy_state={})
        self._wait_for_checkpoint()
        assert self._persisting is not None, "checkpoints are made by run()"
        self._persisted = self._persisting.submit(self._persist, checkpoint, strategy_file, record)

    def _wait_for_checkpoint(self) -> None:
        """Wait until the last round's checkpoint is on disk; raises the OSError that kept it
        from being written (the run then stops, as for any storage failure)."""
        persisted, self._persisted = self._persisted, None
        if persisted is not None:
            persisted.result()

    def _persist(
        self, checkpoint: Checkpoint, strategy_file: PayloadFile | None, record: RoundRecord
    ) -> None:
        make_durable(checkpoint.model.path)
        self._checkpoints.commit(checkpoint, strategy_file)
        self._completed_round = checkpoint.round
        # Keep the models that retained checkpoints name, plus the previous round's (a download
        # that started just before the switch may still be reading it).
        keep = {*self._checkpoints.retained_rounds(), checkpoint.round - 1}
        for path in self._config.state_dir.glob("global-*.safetensors"):
            number = path.name.removeprefix("global-").removesuffix(".safetensors")
            if number.isdigit() and int(number) not in keep:
                self._retire_global(path)
        # Reported once checkpointed: a round in metrics.jsonl is a round a restart resumes
        # after (a crash before this point repeats it).
        if self._on_round:
            self._on_round(record)

    def _retire_global(self, path: Path) -> None:
        """A global model no checkpoint or download needs: kept as the file the next one is
        written into (rewriting its pages, rather than new page cache every round: see
        Spool), unless a stream may still read it (a straggler's download must see the bytes
        it was announced), or one is kept already."""
        published = self._published.pop(path, None)  # None: not written by this run
        payload = published() if published is not None else None
        unread = published is not None and (payload is None or not payload.streaming())
        if unread and not self._spare_global.exists():
            path.replace(self._spare_global)
        else:
            path.unlink(missing_ok=True)

    def _close_client_rows(self, *, completed: bool) -> None:
        """The round attempt is over: its rows go to clients.jsonl."""
        rows = self.board.client_rows
        if rows is not None:
            rows.close(completed=completed, connected=self.board.alive_clients())


def _weighted_mean(results: list[tuple[int, Mapping[str, float]]], key: str) -> float | None:
    pairs = [(n, m[key]) for n, m in results if key in m]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def _largest(results: list[tuple[int, Mapping[str, float]]], key: str) -> float | None:
    values = [m[key] for _, m in results if key in m]
    return max(values) if values else None
