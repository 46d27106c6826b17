"""The phase machine on its own: client events (join, poll, a result settled) and the run loop's
(sample, open a phase, stop) drive it directly, with no transport, files or aggregation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fedlink.common.errors import UpdateRejected
from fedlink.common.wire import JOIN_REQUIRED, PayloadFile, PayloadInfo
from fedlink.server.board import PhaseBoard
from fedlink.server.config import ServerConfig
from fedlink.server.monitoring import CoordinatorMetrics
from fedlink.server.phases import Phase, TaskKind
from fedlink.server.status import RunStatus


def _board(tmp_path: Path, **overrides: Any) -> PhaseBoard:
    settings: dict[str, Any] = {
        "insecure": True,
        "state_dir": tmp_path / "state",
        "run_dir": tmp_path / "run",
        "min_clients": 1,
        "min_fit_clients": 1,
        "min_results": 1,
        "heartbeat_interval_seconds": 0.1,
        "liveness_timeout_seconds": 0.3,
    }
    settings.update(overrides)
    config = ServerConfig(**settings)
    return PhaseBoard(config, RunStatus(config.num_rounds, 0.3), CoordinatorMetrics())


def _phase(participants: set[str], quorum: int = 1) -> Phase:
    payload = PayloadFile(Path("/nonexistent"), PayloadInfo(size=1, blake3=bytes(32)))
    return Phase(
        kind=TaskKind.TRAIN,
        round=1,
        task_id="t1",
        participants=frozenset(participants),
        payload=payload,
        quorum=quorum,
    )


def _settle(board: PhaseBoard, phase: Phase, identity: str) -> None:
    """What result intake records when a participant's result is accepted."""
    with board.cond:
        phase.delivered.add(identity)
        phase.finished.add(identity)
        board.cond.notify_all()


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _open(
    pool: ThreadPoolExecutor, board: PhaseBoard, phase: Phase, timeout: float = 30
) -> tuple[Future[Phase | None], threading.Event]:
    stop = threading.Event()
    closed = pool.submit(board.run_phase, phase, timeout, stop)
    while board.phase is not phase:
        time.sleep(0.01)
    return closed, stop


def test_opening_a_phase_wakes_its_participants_polls_and_no_other(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    board = _board(tmp_path)
    for identity in ("a", "b"):
        board.join(identity)
    woken: list[str] = []
    assert board.poll_task("a", lambda: woken.append("a")) is None
    assert board.poll_task("b", lambda: woken.append("b")) is None
    phase = _phase({"a"})
    closed, _ = _open(pool, board, phase)
    assert woken == ["a"]
    offer = board.poll_task("a")
    assert offer is not None and offer.kind is TaskKind.TRAIN and offer.task_id == "t1"
    assert offer.seed == board.client_seed(1, "a")
    assert board.poll_task("b") is None  # not a participant
    _settle(board, phase, "a")
    assert closed.result(10) is phase and not phase.open and board.phase is None
    assert board.poll_task("a") is None  # its result is in: nothing more to do


def test_a_phase_closes_early_when_everyone_missing_has_gone_silent(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    board = _board(tmp_path)
    for identity in ("a", "b"):
        board.join(identity)
    phase = _phase({"a", "b"})
    closed, _ = _open(pool, board, phase)
    _settle(board, phase, "a")
    started = time.monotonic()
    assert closed.result(10) is phase  # "b" never heard from again: liveness 0.3 s
    assert time.monotonic() - started < 5
    assert phase.delivered == {"a"}


def test_a_client_downloading_its_task_is_alive_without_heartbeats(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    # Clients send no heartbeats while a call is in progress: a download longer than the
    # liveness timeout (0.3 s here) must not make the phase close without the client.
    board = _board(tmp_path)
    for identity in ("a", "b"):
        board.join(identity)
    phase = _phase({"a", "b"})
    closed, _ = _open(pool, board, phase, timeout=30)
    _settle(board, phase, "a")
    with board.downloading("b"):
        time.sleep(1.5)  # five liveness timeouts, with the close checked 4 times a second
        assert not closed.done()
    time.sleep(0.1)
    assert not closed.done(), "the download's end is a sign of life"
    assert closed.result(10) is phase  # then silent: closed without "b"
    assert phase.delivered == {"a"}


def test_operators_see_a_client_waiting_in_a_poll_or_downloading_as_connected(
    tmp_path: Path,
) -> None:
    board = _board(tmp_path)  # liveness timeout 0.3 s
    for identity in ("waiting", "downloading", "silent"):
        board.join(identity)
    assert board.poll_task("waiting", wake=lambda: None) is None
    with board.downloading("downloading"):
        time.sleep(0.5)
        connected = {c["identity"]: c["connected"] for c in board.status.snapshot()["clients"]}
    assert connected == {"waiting": True, "downloading": True, "silent": False}


def test_below_quorum_wait_holds_a_phase_open_past_its_deadline(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    board = _board(tmp_path, below_quorum="wait")
    for identity in ("a", "b"):
        board.join(identity)
    phase = _phase({"a", "b"}, quorum=2)
    closed, _ = _open(pool, board, phase, timeout=0.2)
    _settle(board, phase, "a")
    time.sleep(1.0)  # past the deadline and "b"'s liveness, one result short of the quorum
    assert not closed.done() and phase.overdue_logged
    _settle(board, phase, "b")
    assert closed.result(10) is phase


def test_a_phase_waits_for_a_result_being_validated(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    board = _board(tmp_path)
    board.join("a")
    phase = _phase({"a"})
    closed, _ = _open(pool, board, phase, timeout=0.1)
    with board.cond:
        phase.validating += 1
    time.sleep(0.8)  # deadline passed, but a result is being validated: it finishes first
    assert not closed.done() and phase.open
    with board.cond:
        phase.validating -= 1
        board.cond.notify_all()
    assert closed.result(10) is phase and not phase.open


def test_stop_ends_the_phase_without_a_result(tmp_path: Path, pool: ThreadPoolExecutor) -> None:
    board = _board(tmp_path)
    board.join("a")
    closed, stop = _open(pool, board, _phase({"a"}))
    stop.set()
    assert closed.result(10) is None


def test_a_finished_run_tells_every_poll_and_join_to_stop(tmp_path: Path) -> None:
    board = _board(tmp_path)
    board.join("a")
    woken: list[str] = []
    assert board.poll_task("a", lambda: woken.append("a")) is None
    assert not board.tell_finished("late")
    board.request_stop()
    assert woken == ["a"] and not board.active
    offer = board.poll_task("a")
    assert offer is not None and offer.kind is TaskKind.STOP
    assert board.tell_finished("late")
    board.wait_for_stop_delivery(grace_seconds=5)  # "a" was told: returns at once


def test_a_coordinator_going_away_sends_clients_back_to_retry(tmp_path: Path) -> None:
    board = _board(tmp_path)
    board.join("a")
    board.shut_down()
    with pytest.raises(UpdateRejected) as refused:
        board.poll_task("a")
    assert refused.value.code == "UNAVAILABLE"
    with pytest.raises(UpdateRejected, match=JOIN_REQUIRED):
        board.poll_task("stranger")


def test_sampling_waits_for_enough_clients_and_is_seeded(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    board = _board(
        tmp_path,
        min_clients=3,
        min_fit_clients=2,
        fraction_fit=0.5,
        seed=7,
        liveness_timeout_seconds=30,
    )
    stop = threading.Event()
    sampled = pool.submit(board.sample, 1, 0, frozenset(), stop)
    for identity in ("a", "b"):
        board.join(identity)
    time.sleep(0.4)
    assert not sampled.done()  # two of the three clients round 1 waits for
    assert board.status.snapshot()["state"] == "waiting for clients"
    with board.cond:  # all four at once: the sampler sees six
        for identity in ("c", "d", "e", "f"):
            board.join(identity)
    first = sampled.result(10)
    assert first is not None and len(first) == 3  # ceil(0.5 x 6)
    assert board.sample(1, 0, frozenset(), stop) == first  # same seed, round, attempt
    retry = board.sample(1, 1, frozenset(first), stop)
    assert retry is not None and not set(retry) & set(first)  # enough others: avoided
    # A round whose clients are there at once never shows "waiting for clients" (operators
    # saw it flash between every two rounds).
    board.status.phase_opened("train", 1, timeout=60, quorum=1, participants=first)
    assert board.sample(2, 0, frozenset(), stop) is not None
    assert board.status.snapshot()["state"] == "running"


def test_byte_counts_are_taken_once_per_round(tmp_path: Path) -> None:
    board = _board(tmp_path)
    board.count_bytes("a", "t1", down=10, up=3)
    board.count_bytes("b", "t1", down=5)
    assert board.take_byte_counts() == (15, 3)
    assert board.take_byte_counts() == (0, 0)
