"""The round engine driven directly, without a network: round policy, liveness, determinism,
checkpoints and shutdown."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.common.errors import UpdateRejected
from fedlink.common.tensors import StateDict, encode_state, open_state_file
from fedlink.common.wire import PayloadInfo
from fedlink.server.checkpoints import CheckpointStore
from fedlink.server.config import ServerConfig
from fedlink.server.rounds import ResultHeader, RoundEngine, RunSummary, TaskKind, TaskOffer


def _state(seed: int) -> StateDict:
    generator = torch.Generator().manual_seed(seed)
    # Values spread over many magnitudes, so the order of a floating-point sum matters.
    scale = torch.logspace(-6, 6, 64)
    return {
        "w": torch.randn(64, 8, generator=generator) * scale[:, None],
        "b": torch.randn(8, generator=generator),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def _config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    settings: dict[str, Any] = {
        "insecure": True,
        "state_dir": tmp_path / "state",
        "run_dir": tmp_path / "run",
        "num_rounds": 1,
        "min_clients": 1,
        "min_fit_clients": 1,
        "min_results": 1,
        "evaluate_every": 0,
        "heartbeat_interval_seconds": 0.1,
        "liveness_timeout_seconds": 0.5,
        "round_timeout_seconds": 60,
    }
    settings.update(overrides)
    return ServerConfig(**settings)


@dataclass
class Running:
    engine: RoundEngine
    thread: threading.Thread
    stop: threading.Event
    result: list[RunSummary]

    def summary(self, timeout: float = 30) -> RunSummary:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the run did not finish"
        return self.result[0]


def _run(engine: RoundEngine) -> Running:
    stop = threading.Event()
    result: list[RunSummary] = []
    thread = threading.Thread(target=lambda: result.append(engine.run(stop)), daemon=True)
    thread.start()
    return Running(engine, thread, stop, result)


@pytest.fixture
def running() -> Iterator[list[Running]]:
    started: list[Running] = []
    yield started
    for run in started:
        run.stop.set()
        run.thread.join(10)


def _task(engine: RoundEngine, identity: str, timeout: float = 10) -> TaskOffer:
    offer = engine.next_task(identity, timeout=timeout)
    assert offer.kind is TaskKind.TRAIN, offer
    return offer


def _first_offer(engine: RoundEngine, names: list[str]) -> tuple[str, TaskOffer]:
    """Poll as `names` in turn until one of them is handed a training task."""
    while True:
        for name in names:
            offer = engine.next_task(name, timeout=0.05)
            if offer.kind is TaskKind.TRAIN:
                return name, offer


def _deliver(engine: RoundEngine, identity: str, offer: TaskOffer, state: StateDict) -> None:
    data = encode_state(state)
    header = ResultHeader(
        task_id=offer.task_id,
        round=offer.round,
        num_examples=10,
        metrics={"loss": 1.0},
        payload=PayloadInfo(size=len(data), sha256=hashlib.sha256(data).digest()),
    )
    upload = engine.open_result(identity, header)
    upload.add_chunk(0, data)
    engine.finish_result(upload)


def _model_bytes(summary: RunSummary) -> bytes:
    return summary.final_model.read_bytes()


def test_the_new_model_does_not_depend_on_the_order_uploads_arrive_in(
    tmp_path: Path, running: list[Running]
) -> None:
    clients = [f"site-{i}" for i in range(5)]
    updates = {name: _state(i + 1) for i, name in enumerate(clients)}
    models = []
    for attempt, order in enumerate([clients, list(reversed(clients)), clients[2:] + clients[:2]]):
        config = _config(tmp_path / str(attempt), min_clients=5, min_fit_clients=5, min_results=5)
        engine = RoundEngine(config, _state(0))
        for name in clients:
            engine.join(name)
        run = _run(engine)
        running.append(run)
        offers = {name: _task(engine, name) for name in clients}
        for name in order:
            _deliver(engine, name, offers[name], updates[name])
        models.append(_model_bytes(run.summary()))
    assert models[0] == models[1] == models[2]
    with open_state_file(run.summary().final_model) as state:
        exact = sum(updates[n]["w"].double() for n in clients) / 5
        magnitude = sum(updates[n]["w"].double().abs() for n in clients) / 5
        assert bool(((state["w"].double() - exact).abs() <= 1e-6 * magnitude).all())
        assert int(state["steps"]) == 5  # integer buffers keep the maximum


def test_a_client_whose_upload_broke_off_gets_the_task_again(
    tmp_path: Path, running: list[Running]
) -> None:
    engine = RoundEngine(_config(tmp_path), _state(0))
    engine.join("site-a")
    run = _run(engine)
    running.append(run)
    offer = _task(engine, "site-a")
    data = encode_state(_state(1))
    header = ResultHeader(
        offer.task_id,
        offer.round,
        10,
        {},
        PayloadInfo(size=len(data), sha256=hashlib.sha256(data).digest()),
    )
    upload = engine.open_result("site-a", header)
    upload.add_chunk(0, data[:100])
    engine.abandon_result(upload)  # the connection dropped mid-upload
    again = _task(engine, "site-a")
    assert again.task_id == offer.task_id and again.seed == offer.seed
    _deliver(engine, "site-a", again, _state(1))
    summary = run.summary()
    assert summary.completed and summary.records[0].clients_accepted == 1
    assert list((tmp_path / "state" / "incoming").iterdir()) == []


def test_a_silent_participant_is_dropped_once_its_liveness_timeout_passes(
    tmp_path: Path, running: list[Running]
) -> None:
    engine = RoundEngine(_config(tmp_path, min_clients=2, min_fit_clients=2), _state(0))
    engine.join("alive")
    engine.join("silent")
    run = _run(engine)
    running.append(run)
    _deliver(engine, "alive", _task(engine, "alive"), _state(1))
    stop_beating = threading.Event()

    def heartbeat() -> None:
        while not stop_beating.wait(0.1):
            engine.touch("alive")

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        # The round deadline is 60 s; the silent client is given up on after 0.5 s of silence.
        summary = run.summary(timeout=20)
    finally:
        stop_beating.set()
    record = summary.records[0]
    assert (record.clients_sampled, record.clients_accepted) == (2, 1)


def test_below_quorum_retry_repeats_the_round_with_other_clients(
    tmp_path: Path, running: list[Running]
) -> None:
    config = _config(
        tmp_path,
        min_clients=3,
        fraction_fit=0.3,
        min_fit_clients=1,
        min_results=1,
        round_timeout_seconds=2,
        liveness_timeout_seconds=60,
    )
    engine = RoundEngine(config, _state(0))
    for name in ("a", "b", "c"):
        engine.join(name)
    run = _run(engine)
    running.append(run)
    first = _first_offer(engine, ["a", "b", "c"])  # sampled, and never answers
    retry = _first_offer(engine, sorted({"a", "b", "c"} - {first[0]}))
    assert retry[1].task_id != first[1].task_id and retry[1].round == 1
    _deliver(engine, retry[0], retry[1], _state(1))
    assert run.summary().completed


def test_below_quorum_wait_keeps_the_round_open_for_a_client_that_comes_back(
    tmp_path: Path, running: list[Running]
) -> None:
    config = _config(
        tmp_path,
        min_clients=2,
        min_fit_clients=2,
        min_results=2,
        below_quorum="wait",
        round_timeout_seconds=0.3,
    )
    engine = RoundEngine(config, _state(0))
    engine.join("a")
    engine.join("b")
    run = _run(engine)
    running.append(run)
    _deliver(engine, "a", _task(engine, "a"), _state(1))
    lost = _task(engine, "b")  # b crashes with the task in hand and stays away past the deadline
    run.thread.join(1.5)
    assert run.thread.is_alive(), "the round closed below its quorum"
    engine.join("b")  # b restarted
    again = _task(engine, "b")
    assert (again.task_id, again.seed) == (lost.task_id, lost.seed)
    _deliver(engine, "b", again, _state(2))
    summary = run.summary()
    assert summary.completed and summary.records[0].clients_accepted == 2


def test_a_stopped_coordinator_asks_clients_to_retry_instead_of_stopping_them(
    tmp_path: Path, running: list[Running]
) -> None:
    engine = RoundEngine(_config(tmp_path, min_clients=2), _state(0))
    engine.join("a")
    run = _run(engine)
    running.append(run)
    run.stop.set()
    summary = run.summary()
    assert summary.stopped_by_signal and not summary.completed
    with pytest.raises(UpdateRejected) as excinfo:
        engine.next_task("a", timeout=0.1)
    assert excinfo.value.code == "UNAVAILABLE"


def _completed_run(config: ServerConfig, running: list[Running], resume: Any = None) -> RunSummary:
    engine = RoundEngine(config, _state(0), resume_from=resume)
    engine.join("a")
    run = _run(engine)
    running.append(run)
    for _ in range(config.num_rounds - (resume.round if resume else 0)):
        offer = _task(engine, "a")
        _deliver(engine, "a", offer, _state(100 + offer.round))
    return run.summary()


def test_a_resumed_run_continues_after_the_last_checkpoint_and_ends_identically(
    tmp_path: Path, running: list[Running]
) -> None:
    whole = _completed_run(_config(tmp_path / "whole", num_rounds=4), running)
    first_half = _completed_run(_config(tmp_path / "split", num_rounds=2), running)
    assert first_half.rounds_completed == 2
    split = _config(tmp_path / "split", num_rounds=4)
    checkpoint = CheckpointStore(split.state_dir, keep=3).latest()
    assert checkpoint is not None and checkpoint.round == 2 and checkpoint.clients == ("a",)
    second_half = _completed_run(split, running, resume=checkpoint)
    assert [r.round for r in second_half.records] == [3, 4]
    assert second_half.rounds_completed == 4 and second_half.completed
    assert _model_bytes(second_half) == _model_bytes(whole)


def test_only_the_newest_checkpoints_and_their_models_are_kept(
    tmp_path: Path, running: list[Running]
) -> None:
    config = _config(tmp_path, num_rounds=6, keep_checkpoints=2)
    _completed_run(config, running)
    checkpoints = sorted(p.name for p in (config.state_dir / "checkpoints").iterdir())
    assert checkpoints == ["round-000005.json", "round-000006.json"]
    models = sorted(p.name for p in config.state_dir.glob("global-*"))
    assert models == ["global-000005.safetensors", "global-000006.safetensors"]
