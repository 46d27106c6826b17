"""Virtual clients taking part in the round engine's rounds, without a network.

The gRPC servicer (server/service.py) translates real clients' calls into the engine's
transport-free API: `join`, `poll_task` with a wake-up, `open_result` / `finish_result`,
`touch`. `VirtualClients` makes the same calls for N identities from one thread: a client
waiting for a task is a registered wake-up (no thread, no memory but its name), a client with a
task has it run on a worker, and its result goes through the engine's intake and validation like
an upload. Sampling, seeds, aggregation, checkpoints and metrics are the engine's own, so a
seeded simulation is the federation it simulates.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from fedlink.common.errors import StorageError, UpdateRejected
from fedlink.common.wire import PayloadInfo, payload_digest
from fedlink.server.phases import ResultHeader, TaskKind, TaskOffer
from fedlink.server.rounds import RoundEngine
from fedlink.simulation.clients import ClientResult, ClientWork

log = logging.getLogger(__name__)

Done = Callable[[ClientResult | BaseException], None]
Event = tuple[str, ClientResult | BaseException | None]


class Workers(Protocol):
    def submit(self, work: ClientWork, done: Done) -> None: ...

    def close(self) -> None: ...


class VirtualClients:
    def __init__(
        self,
        engine: RoundEngine,
        names: Sequence[str],
        workers: Workers,
        heartbeat_seconds: float,
        on_failure: Callable[[str], None],
    ) -> None:
        self._engine = engine
        self._index = {name: index for index, name in enumerate(names)}
        self._workers = workers
        self._heartbeat = heartbeat_seconds
        self._on_failure = on_failure
        # (identity, None): woken, may have a task; (identity, result): its task is done.
        self._events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._busy: dict[str, TaskOffer] = {}
        self.failure: str | None = None

    def join(self) -> None:
        """Every virtual client joins and waits for a task."""
        with _quiet(logging.getLogger("fedlink.server.board")):
            for name in self._index:
                self._engine.board.join(name)
        log.info("%d virtual clients joined", len(self._index))
        for name in self._index:
            self._poll(name)

    def run(self, stop: threading.Event) -> None:
        """Hand tasks to the workers and results to the engine until `stop` (then `close`)."""
        next_beat = time.monotonic() + self._heartbeat
        while not stop.is_set():
            try:
                event = self._events.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                event = None
            if time.monotonic() >= next_beat:
                # A client in training is alive, as a real one's heartbeats say.
                for name in list(self._busy):
                    self._engine.board.touch(name)
                next_beat = time.monotonic() + self._heartbeat
            if event is None:
                continue
            identity, result = event
            if result is None:
                self._poll(identity)
            else:
                self._hand_in(identity, result)

    def close(self) -> None:
        """Wake `run` to see that it must stop."""
        self._events.put(None)

    def _poll(self, identity: str) -> None:
        try:
            offer = self._engine.board.poll_task(
                identity, functools.partial(self._events.put, (identity, None))
            )
        except UpdateRejected:
            return  # the run is shutting down
        if offer is None or offer.kind is TaskKind.STOP:
            return
        assert offer.kind in (TaskKind.TRAIN, TaskKind.EVALUATE) and offer.payload is not None
        self._busy[identity] = offer
        self._engine.board.count_bytes(identity, offer.task_id, down=offer.payload.info.size)
        work = ClientWork(
            identity=identity,
            index=self._index[identity],
            train=offer.kind is TaskKind.TRAIN,
            seed=offer.seed,
            model=offer.payload.path,
        )
        self._workers.submit(work, lambda result: self._events.put((identity, result)))

    def _hand_in(self, identity: str, result: ClientResult | BaseException) -> None:
        offer = self._busy.pop(identity)
        if isinstance(result, BaseException):
            if self.failure is None:
                self.failure = str(result)
                self._on_failure(self.failure)
            return
        update = result.update
        payload = None
        if update is not None:
            payload = PayloadInfo(size=len(update), blake3=payload_digest(update))
        header = ResultHeader(
            offer.task_id, offer.round, result.num_examples, result.metrics, payload
        )
        try:
            upload = self._engine.results.open_result(identity, header)
            try:
                if update is not None:
                    upload.add_chunk(0, update)
                    self._engine.board.count_bytes(identity, offer.task_id, up=len(update))
            except UpdateRejected as exc:
                self._engine.results.reject_result(upload, exc)
                raise
            try:
                self._engine.results.finish_result(upload)
            except StorageError as exc:
                self._engine.results.defer_result(upload, exc)
                raise
        except (UpdateRejected, StorageError) as exc:
            log.warning("round %d: %s's result was refused: %s", offer.round, identity, exc)
        self._poll(identity)


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Warnings only from `logger` meanwhile (one line per joining client is 10,000 lines)."""
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
