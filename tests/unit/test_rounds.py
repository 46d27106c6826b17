"""The round engine driven directly, without a network: round policy, liveness, determinism,
checkpoints and shutdown."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.common.accounting import MechanismStep, PrivacyAccountant
from fedlink.common.errors import ConfigError, UpdateRejected
from fedlink.common.tensors import StateDict, encode_state, open_state_file
from fedlink.common.wire import PayloadInfo, payload_digest
from fedlink.server import rounds as rounds_module
from fedlink.server.checkpoints import CheckpointStore
from fedlink.server.config import ServerConfig
from fedlink.server.metrics import MetricAggregator
from fedlink.server.phases import ResultHeader, RoundRecord, RunSummary, TaskKind, TaskOffer
from fedlink.server.rounds import RoundEngine
from fedlink.server.validation import model_norm


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
    offer = engine.board.next_task(identity, timeout=timeout)
    assert offer.kind is TaskKind.TRAIN, offer
    return offer


def _first_offer(engine: RoundEngine, names: list[str]) -> tuple[str, TaskOffer]:
    """Poll as `names` in turn until one of them is handed a training task."""
    while True:
        for name in names:
            offer = engine.board.next_task(name, timeout=0.05)
            if offer.kind is TaskKind.TRAIN:
                return name, offer


def _deliver(
    engine: RoundEngine, identity: str, offer: TaskOffer, state: StateDict, num_examples: int = 10
) -> None:
    data = encode_state(state)
    header = ResultHeader(
        task_id=offer.task_id,
        round=offer.round,
        num_examples=num_examples,
        metrics={"loss": 1.0},
        payload=PayloadInfo(size=len(data), blake3=payload_digest(data)),
    )
    upload = engine.results.open_result(identity, header)
    upload.add_chunk(0, data)
    engine.results.finish_result(upload)


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
            engine.board.join(name)
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
        assert int(state["steps"]) == 3  # integer buffers: median of the votes 0 (global), 1..5


def test_a_client_whose_upload_broke_off_gets_the_task_again(
    tmp_path: Path, running: list[Running]
) -> None:
    engine = RoundEngine(_config(tmp_path), _state(0))
    engine.board.join("site-a")
    run = _run(engine)
    running.append(run)
    offer = _task(engine, "site-a")
    data = encode_state(_state(1))
    header = ResultHeader(
        offer.task_id,
        offer.round,
        10,
        {},
        PayloadInfo(size=len(data), blake3=payload_digest(data)),
    )
    upload = engine.results.open_result("site-a", header)
    upload.add_chunk(0, data[:100])
    engine.results.abandon_result(upload)  # the connection dropped mid-upload
    again = _task(engine, "site-a")
    assert again.task_id == offer.task_id and again.seed == offer.seed
    _deliver(engine, "site-a", again, _state(1))
    summary = run.summary()
    assert summary.completed and summary.last_record is not None
    assert summary.last_record.clients_accepted == 1
    assert list((tmp_path / "state" / "incoming").iterdir()) == []


def test_a_silent_participant_is_dropped_once_its_liveness_timeout_passes(
    tmp_path: Path, running: list[Running]
) -> None:
    engine = RoundEngine(_config(tmp_path, min_clients=2, min_fit_clients=2), _state(0))
    engine.board.join("alive")
    engine.board.join("silent")
    run = _run(engine)
    running.append(run)
    _deliver(engine, "alive", _task(engine, "alive"), _state(1))
    stop_beating = threading.Event()

    def heartbeat() -> None:
        while not stop_beating.wait(0.1):
            engine.board.touch("alive")

    beating = threading.Thread(target=heartbeat, daemon=True)
    beating.start()
    try:
        # The round deadline is 60 s; the silent client is given up on after 0.5 s of silence.
        summary = run.summary(timeout=20)
    finally:
        stop_beating.set()
    record = summary.last_record
    assert record is not None
    assert (record.clients_sampled, record.clients_accepted) == (2, 1)


def test_a_participant_that_leaves_is_dropped_at_once_and_not_sampled_again(
    tmp_path: Path, running: list[Running]
) -> None:
    # Liveness and round deadline far beyond the test: only the Leave can close the round.
    config = _config(
        tmp_path,
        num_rounds=2,
        min_clients=2,
        min_fit_clients=1,
        fraction_fit=1.0,
        liveness_timeout_seconds=60,
    )
    engine = RoundEngine(config, _state(0))
    engine.board.join("stays")
    engine.board.join("leaves")
    run = _run(engine)
    running.append(run)
    first = _task(engine, "stays")
    _task(engine, "leaves")  # pulled, then the client stops
    _deliver(engine, "stays", first, _state(1))
    engine.board.leave("leaves", "received SIGTERM")
    engine.board.leave("leaves", "said twice")  # a second Leave changes nothing
    second = _task(engine, "stays")
    assert second.round == 2
    with pytest.raises(UpdateRejected, match="Join"):
        engine.board.next_task("leaves", timeout=0.1)  # must join again to take part
    _deliver(engine, "stays", second, _state(2))
    summary = run.summary(timeout=20)
    assert summary.completed
    assert summary.last_record is not None and summary.last_record.clients_sampled == 1


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
        engine.board.join(name)
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
    engine.board.join("a")
    engine.board.join("b")
    run = _run(engine)
    running.append(run)
    _deliver(engine, "a", _task(engine, "a"), _state(1))
    lost = _task(engine, "b")  # b crashes with the task in hand and stays away past the deadline
    run.thread.join(1.5)
    assert run.thread.is_alive(), "the round closed below its quorum"
    engine.board.join("b")  # b restarted
    again = _task(engine, "b")
    assert (again.task_id, again.seed) == (lost.task_id, lost.seed)
    _deliver(engine, "b", again, _state(2))
    summary = run.summary()
    assert summary.completed and summary.last_record is not None
    assert summary.last_record.clients_accepted == 2


def test_a_stopped_coordinator_asks_clients_to_retry_instead_of_stopping_them(
    tmp_path: Path, running: list[Running]
) -> None:
    engine = RoundEngine(_config(tmp_path, min_clients=2), _state(0))
    engine.board.join("a")
    run = _run(engine)
    running.append(run)
    run.stop.set()
    summary = run.summary()
    assert summary.stopped_by_signal and not summary.completed
    with pytest.raises(UpdateRejected) as excinfo:
        engine.board.next_task("a", timeout=0.1)
    assert excinfo.value.code == "UNAVAILABLE"


def _completed_run(
    config: ServerConfig,
    running: list[Running],
    resume: Any = None,
    initial: StateDict | None = None,
    records: list[RoundRecord] | None = None,
) -> RunSummary:
    engine = RoundEngine(
        config,
        _state(0) if initial is None else initial,
        resume_from=resume,
        on_round=None if records is None else records.append,
    )
    engine.board.join("a")
    run = _run(engine)
    running.append(run)
    for expected in range((resume.round if resume else 0) + 1, config.num_rounds + 1):
        offer = _task(engine, "a")
        assert offer.round == expected  # a resumed run starts after its checkpoint
        if initial is None:
            local = _state(100 + offer.round)
        else:  # the same tensors as `initial`, moved a little
            local = {k: v + offer.round if v.is_floating_point() else v for k, v in initial.items()}
        _deliver(engine, "a", offer, local)
    return run.summary()


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_resumed_run_continues_after_the_last_checkpoint_and_ends_identically(
    tmp_path: Path, running: list[Running], strategy: str
) -> None:
    whole = _completed_run(_config(tmp_path / "whole", num_rounds=4, strategy=strategy), running)
    first_half = _completed_run(
        _config(tmp_path / "split", num_rounds=2, strategy=strategy), running
    )
    assert first_half.rounds_completed == 2
    split = _config(tmp_path / "split", num_rounds=4, strategy=strategy)
    checkpoint = CheckpointStore(split.state_dir, keep=3).latest()
    assert checkpoint is not None and checkpoint.round == 2 and checkpoint.clients == ("a",)
    # A server optimizer's moments travel with the checkpoint: without them the resumed run
    # would step from zero moments and end elsewhere.
    assert sorted(checkpoint.strategy_state) == (
        ["m/b", "m/w", "v/b", "v/w"] if strategy == "fedadam" else []
    )
    second_half = _completed_run(split, running, resume=checkpoint)
    assert second_half.last_record is not None and second_half.last_record.round == 4
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


def test_a_robust_rule_keeps_a_huge_update_from_moving_the_model(
    tmp_path: Path, running: list[Running]
) -> None:
    clients = [f"site-{i}" for i in range(5)]
    config = _config(
        tmp_path, min_clients=5, min_fit_clients=5, min_results=5, aggregation="median"
    )
    initial = _state(0)
    engine = RoundEngine(config, initial)
    for name in clients:
        engine.board.join(name)
    run = _run(engine)
    running.append(run)
    honest = {k: v.clone() for k, v in initial.items()}
    honest["w"] += 1.0
    for name in clients:
        update = {k: v.clone() for k, v in honest.items()}
        if name == "site-3":
            update["w"] = initial["w"] + 1e6
        _deliver(engine, name, _task(engine, name), update)
    with open_state_file(run.summary().final_model) as state:
        assert torch.equal(state["w"], honest["w"])


def _upload_bytes(
    engine: RoundEngine, identity: str, offer: TaskOffer, data: bytes, chunk: int = 7
) -> Any:
    """Open a result and send `data` in `chunk`-byte pieces (elements split between them)."""
    header = ResultHeader(
        task_id=offer.task_id,
        round=offer.round,
        num_examples=10,
        metrics={},
        payload=PayloadInfo(size=len(data), blake3=payload_digest(data)),
    )
    upload = engine.results.open_result(identity, header)
    for offset in range(0, len(data), chunk):
        upload.add_chunk(offset, data[offset : offset + chunk])
    return upload


def _one_client(tmp_path: Path, running: list[Running], initial: StateDict) -> RoundEngine:
    """A running one-round engine that client "site-a" has joined."""
    engine = RoundEngine(_config(tmp_path), initial)
    engine.board.join("site-a")
    running.append(_run(engine))
    return engine


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (lambda w: w.view(-1).__setitem__(101, float("nan")), "contains NaN or Inf"),
        (lambda w: w.view(-1).__setitem__(7, float("-inf")), "contains NaN or Inf"),
        (lambda w: w.add_(1e9), "away from the global model"),
        (lambda w: w.add_(1.0), None),
    ],
)
def test_an_update_is_judged_from_the_values_measured_as_it_arrived(
    tmp_path: Path, running: list[Running], change: Any, refusal: str | None
) -> None:
    initial = _state(0)
    engine = _one_client(tmp_path, running, initial)
    update = {name: tensor.clone() for name, tensor in initial.items()}
    change(update["w"])
    upload = _upload_bytes(engine, "site-a", _task(engine, "site-a"), encode_state(update))
    # Measured on the way in: the stored update is not read again to be judged.
    assert upload.inspector.findings() is not None
    if refusal is None:
        engine.results.finish_result(upload)
        return
    with pytest.raises(UpdateRejected, match=refusal):
        engine.results.finish_result(upload)


def test_a_round_knows_its_global_models_norm_from_when_the_model_was_written(
    tmp_path: Path, running: list[Running]
) -> None:
    initial = _state(0)
    engine = _one_client(tmp_path, running, initial)
    _task(engine, "site-a")
    phase = engine.board.phase
    assert phase is not None
    # No upload has been judged yet: the bound's reference was not read back from disk.
    assert phase.global_norm == model_norm(initial)


def test_an_update_the_inspector_cannot_follow_is_read_back_and_refused_as_before(
    tmp_path: Path, running: list[Running]
) -> None:
    initial = _state(0)
    engine = _one_client(tmp_path, running, initial)
    data = bytearray(encode_state(initial))
    data[8] = ord("[")  # the header is no JSON object
    upload = _upload_bytes(engine, "site-a", _task(engine, "site-a"), bytes(data))
    assert upload.inspector.findings() is None
    with pytest.raises(UpdateRejected, match="not a valid safetensors payload"):
        engine.results.finish_result(upload)


# ---- client-level differential privacy (DP-FedAvg) ----------------------------------------------


def _flat(size: int) -> StateDict:
    return {"w": torch.zeros(size), "steps": torch.tensor(0, dtype=torch.int64)}


def _dp_round(
    tmp_path: Path,
    running: list[Running],
    initial: StateDict,
    updates: dict[str, StateDict],
    **overrides: Any,
) -> StateDict:
    """One DP round with `updates` (client -> local model); the new global model."""
    n = len(updates)
    config = _config(tmp_path, min_clients=n, min_fit_clients=n, min_results=n, **overrides)
    engine = RoundEngine(config, initial)
    for name in updates:
        engine.board.join(name)
    run = _run(engine)
    running.append(run)
    for i, (name, update) in enumerate(sorted(updates.items())):
        _deliver(engine, name, _task(engine, name), update, num_examples=10**i)
    summary = run.summary()
    assert summary.completed
    with open_state_file(summary.final_model) as state:
        return {k: v.clone() for k, v in state.items()}


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # z ~ 0: epsilon huge
def test_dp_clips_each_update_and_averages_with_uniform_weights(
    tmp_path: Path, running: list[Running]
) -> None:
    initial = _flat(1000)
    direction = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    big = {"w": direction * 1e4, "steps": torch.tensor(1)}  # norm ~3e5, clipped to 2
    small = {"w": direction / direction.norm() * 0.5, "steps": torch.tensor(1)}  # norm 0.5: kept
    result = _dp_round(
        tmp_path,
        running,
        initial,
        {"a": big, "b": small},
        dp_clip_norm=2.0,
        dp_noise_multiplier=1e-9,
        max_update_norm_ratio=0,  # the clipping at work, not the bound that refuses far updates
    )
    unit = direction / direction.norm()
    # (2 u + 0.5 u) / 2, whatever the sample counts (10 and 100) the clients reported.
    assert torch.allclose(result["w"], 1.25 * unit, atol=1e-6)
    assert float(result["w"].norm()) == pytest.approx(1.25, rel=1e-5)


def test_dp_adds_gaussian_noise_of_z_times_s_to_the_sum(
    tmp_path: Path, running: list[Running]
) -> None:
    initial = _flat(200_000)
    unchanged = {name: _flat(200_000) for name in ("a", "b", "c", "d")}
    result = _dp_round(
        tmp_path, running, initial, unchanged, dp_clip_norm=2.0, dp_noise_multiplier=1.5
    )
    noise = result["w"].to(torch.float64)
    # N(0, (1.5 * 2)^2) on the sum of 4 updates is N(0, 0.75^2) on their mean.
    assert float(noise.std()) == pytest.approx(0.75, rel=0.02)
    assert abs(float(noise.mean())) < 0.01
    assert int(result["steps"]) == 0  # counters are not noised


def _epsilon(rounds: int, z: float, delta: float = 1e-5) -> float:
    return PrivacyAccountant((MechanismStep(z, 1.0, rounds),)).epsilon(delta)


def test_dp_reports_epsilon_every_round_and_checkpoints_the_accountant(
    tmp_path: Path, running: list[Running]
) -> None:
    config = _config(tmp_path, num_rounds=3, dp_clip_norm=1.0, dp_noise_multiplier=2.0)
    records: list[RoundRecord] = []
    _completed_run(config, running, initial=_flat(100), records=records)
    epsilons = [r.epsilon for r in records]
    assert epsilons == pytest.approx([_epsilon(k, 2.0) for k in (1, 2, 3)])
    assert epsilons == sorted(epsilons) and epsilons[0] is not None and epsilons[0] > 0
    checkpoint = CheckpointStore(config.state_dir, keep=3).latest()
    assert checkpoint is not None
    assert checkpoint.privacy == (MechanismStep(2.0, 1.0, 3),)
    assert checkpoint.record["epsilon"] == pytest.approx(epsilons[-1])


def test_dp_stops_cleanly_before_the_round_that_would_exceed_the_budget(
    tmp_path: Path, running: list[Running]
) -> None:
    budget = (_epsilon(2, 2.0) + _epsilon(3, 2.0)) / 2
    config = _config(
        tmp_path, num_rounds=5, dp_clip_norm=1.0, dp_noise_multiplier=2.0, dp_max_epsilon=budget
    )
    records: list[RoundRecord] = []
    engine = RoundEngine(config, _flat(100), on_round=records.append)
    engine.board.join("a")
    run = _run(engine)
    running.append(run)
    for _ in range(2):
        offer = _task(engine, "a")
        _deliver(engine, "a", offer, _flat(100))
    summary = run.summary()
    assert summary.budget_spent and not summary.completed
    assert summary.rounds_completed == 2 and len(records) == 2
    exported = engine.metrics.registry.get_sample_value("fedlink_dp_epsilon")
    assert exported == pytest.approx(_epsilon(2, 2.0))
    assert engine.board.next_task("a", timeout=1).kind is TaskKind.STOP


def test_a_resumed_dp_run_continues_the_accounting(tmp_path: Path, running: list[Running]) -> None:
    dp = {"dp_clip_norm": 1.0, "dp_noise_multiplier": 2.0}
    _completed_run(_config(tmp_path, num_rounds=2, **dp), running, initial=_flat(100))
    config = _config(tmp_path, num_rounds=4, **dp)
    checkpoint = CheckpointStore(config.state_dir, keep=3).latest()
    assert checkpoint is not None and checkpoint.round == 2
    records: list[RoundRecord] = []
    _completed_run(config, running, resume=checkpoint, initial=_flat(100), records=records)
    assert [r.epsilon for r in records] == pytest.approx([_epsilon(3, 2.0), _epsilon(4, 2.0)])
    with pytest.raises(ConfigError, match="with differential privacy"):
        RoundEngine(_config(tmp_path, num_rounds=4), _flat(100), resume_from=checkpoint)


def test_dp_cannot_be_switched_on_in_the_middle_of_a_run(
    tmp_path: Path, running: list[Running]
) -> None:
    _completed_run(_config(tmp_path, num_rounds=1), running, initial=_flat(100))
    config = _config(tmp_path, num_rounds=2, dp_clip_norm=1.0)
    checkpoint = CheckpointStore(config.state_dir, keep=3).latest()
    assert checkpoint is not None and checkpoint.privacy == ()
    with pytest.raises(ConfigError, match="not all trained with differential privacy"):
        RoundEngine(config, _flat(100), resume_from=checkpoint)


def test_a_checkpoint_written_before_dp_existed_still_loads(
    tmp_path: Path, running: list[Running]
) -> None:
    config = _config(tmp_path, num_rounds=1)
    _completed_run(config, running)
    (path,) = (config.state_dir / "checkpoints").iterdir()
    document = json.loads(path.read_text())
    del document["privacy"]
    path.write_text(json.dumps(document))
    checkpoint = CheckpointStore(config.state_dir, keep=3).latest()
    assert checkpoint is not None and checkpoint.round == 1 and checkpoint.privacy == ()


def test_a_round_records_the_tasks_metrics_combined_as_the_task_says(
    tmp_path: Path, running: list[Running]
) -> None:
    def count_total(results: Any) -> dict[str, float]:
        return {"count": sum(metrics["stat.count"] for _, metrics in results)}

    records: list[RoundRecord] = []
    config = _config(tmp_path, evaluate_every=1, min_clients=2, min_fit_clients=2)
    engine = RoundEngine(
        config,
        _state(0),
        evaluate_centrally=lambda state: {"loss": 0.25, "mae": 2.0},
        on_round=records.append,
        aggregate_evaluation=MetricAggregator(not_averaged=("stat.*",), custom=count_total),
    )
    clients = ["site-0", "site-1"]
    for name in clients:
        engine.board.join(name)
    run = _run(engine)
    running.append(run)
    for name in clients:
        _deliver(engine, name, _task(engine, name), _state(1))
    for number, name in enumerate(clients, start=1):
        offer = engine.board.next_task(name, timeout=10)
        assert offer.kind is TaskKind.EVALUATE
        metrics = {"loss": float(number), "mae": float(number), "stat.count": 5.0}
        header = ResultHeader(offer.task_id, offer.round, 10 * number, metrics, None)
        engine.results.finish_result(engine.results.open_result(name, header))
    run.summary()
    (record,) = records
    assert record.test_loss == 0.25 and record.test_accuracy is None
    assert record.test_metrics == {"mae": 2.0}
    # Weighted by examples (10 and 20); the statistic is the task's, never averaged.
    assert record.federated_loss == pytest.approx(5 / 3)
    assert record.federated_metrics == {"mae": pytest.approx(5 / 3), "count": 10.0}


def test_a_finished_run_is_told_to_the_clients_of_the_run_even_after_a_restart(
    tmp_path: Path, running: list[Running], pki: Any
) -> None:
    fast = {"num_rounds": 1, "min_clients": 1, "min_fit_clients": 1, "evaluate_every": 0}
    config = pki.server_config(tmp_path, **fast)
    _completed_run(config, running)
    # Started again on the finished run: "a" is known from the checkpoint but not seen yet.
    checkpoint = CheckpointStore(config.state_dir, keep=3).latest()
    engine = RoundEngine(config, _state(0), resume_from=checkpoint)
    summary = _run(engine).summary()
    assert summary.completed and summary.last_record is None
    started = time.monotonic()
    engine.board.wait_for_stop_delivery(grace_seconds=0.3)
    assert time.monotonic() - started >= 0.3  # it waited for "a"
    done = threading.Event()
    waiter = threading.Thread(target=engine.board.wait_for_stop_delivery, args=(30, done))
    waiter.start()
    engine.board.join("a")
    assert engine.board.tell_finished("a")  # what Join answers: the run is finished
    waiter.join(5)
    assert not waiter.is_alive(), "every client of the run was told: the wait must end"
    assert not done.is_set()


def test_a_running_federation_does_not_answer_finished_at_join(tmp_path: Path) -> None:
    engine = RoundEngine(_config(tmp_path, num_rounds=3), _state(0))
    engine.board.join("a")
    assert not engine.board.tell_finished("a")
    engine.request_stop()
    assert engine.board.tell_finished("a")
    assert engine.board.next_task("a", timeout=1).kind is TaskKind.STOP


def test_log_lines_name_at_most_ten_clients() -> None:
    from fedlink.server.board import names as _names

    assert _names(["a", "b"]) == "a, b"
    many = [f"site-{i}" for i in range(10_000)]
    assert _names(many) == ", ".join(many[:10]) + " and 9990 more"


def test_a_client_waiting_in_a_long_poll_is_alive_without_heartbeats(tmp_path: Path) -> None:
    # Clients send no heartbeats while a poll waits (10,000 idle clients would send 1,000 a
    # second): the open poll itself keeps them alive past the liveness timeout.
    config = _config(tmp_path, heartbeat_interval_seconds=0.1, liveness_timeout_seconds=0.2)
    engine = RoundEngine(config, _state(0))
    engine.board.join("a")
    poll = threading.Thread(target=engine.board.next_task, args=("a", 1.0))
    poll.start()
    time.sleep(0.5)
    assert engine.board.alive_clients() == ["a"]
    poll.join()
    time.sleep(0.3)
    assert engine.board.alive_clients() == []


def test_a_retired_global_model_file_is_rewritten_for_a_later_one(
    tmp_path: Path, running: list[Running]
) -> None:
    """New page cache for every round's model is what a VM that returns freed memory to its
    host makes dear: the file of a model no checkpoint keeps is rewritten in place instead."""
    config = _config(tmp_path, num_rounds=5, keep_checkpoints=1)
    inodes: list[dict[str, int]] = []

    def snapshot(record: RoundRecord) -> None:
        inodes.append({p.name: p.stat().st_ino for p in config.state_dir.glob("global-*")})

    engine = RoundEngine(config, _state(0), on_round=snapshot)
    engine.board.join("a")
    run = _run(engine)
    running.append(run)
    for _ in range(5):
        offer = _task(engine, "a")
        _deliver(engine, "a", offer, _state(100 + offer.round))
    assert run.summary().completed
    # Round r writes global-r; global-(r-1) stays for downloads still under way; older ones
    # retire into global-spare.part, which the next round's model is written into: round 4's
    # model is round 1's file rewritten, round 5's is round 2's.
    assert inodes[3]["global-000004.safetensors"] == inodes[0]["global-000001.safetensors"]
    assert inodes[4]["global-000005.safetensors"] == inodes[1]["global-000002.safetensors"]
    # Every kept model is exactly what its checkpoint recorded (the store checks the digest).
    checkpoint = CheckpointStore(config.state_dir, keep=1).latest()
    assert checkpoint is not None and checkpoint.round == 5
    assert not (config.state_dir / "global-spare.part").exists()  # removed when the run ends


def test_the_next_round_starts_while_a_checkpoint_is_still_being_synced(
    tmp_path: Path, running: list[Running], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Syncing a round's model file is off the round's path: on a slow disk (here, one that
    syncs only when told to) clients get the next task meanwhile."""
    synced = threading.Event()
    sync = rounds_module.make_durable

    def slow_disk(path: Path) -> None:
        assert synced.wait(10)
        sync(path)

    monkeypatch.setattr(rounds_module, "make_durable", slow_disk)
    reported: list[int] = []
    config = _config(tmp_path, num_rounds=2)
    engine = RoundEngine(config, _state(0), on_round=lambda record: reported.append(record.round))
    engine.board.join("a")
    run = _run(engine)
    running.append(run)
    _deliver(engine, "a", _task(engine, "a"), _state(1))
    offer = _task(engine, "a")
    assert offer.round == 2
    # Not yet on disk, so not yet reported: a restart now would repeat round 1.
    assert CheckpointStore(config.state_dir, keep=3).latest() is None
    assert reported == []
    synced.set()
    _deliver(engine, "a", offer, _state(2))
    assert run.summary().completed
    assert reported == [1, 2]
    checkpoint = CheckpointStore(config.state_dir, keep=3).latest()
    assert checkpoint is not None and checkpoint.round == 2


def test_a_global_model_still_being_downloaded_is_never_rewritten(
    tmp_path: Path, running: list[Running]
) -> None:
    """A straggler still downloading an old model must get the bytes it was announced."""

    def model(seed: int) -> StateDict:
        return {"w": torch.randn(8192, generator=torch.Generator().manual_seed(seed))}

    config = _config(tmp_path, num_rounds=4, keep_checkpoints=1)
    engine = RoundEngine(config, model(0))
    engine.board.join("a")
    run = _run(engine)
    running.append(run)
    first = _task(engine, "a")
    assert first.payload is not None
    stream = first.payload.chunks(4096)
    received = [b"".join(next(stream)[1])]  # a download of the first model, left half done
    _deliver(engine, "a", first, model(1))
    for _ in range(3):
        offer = _task(engine, "a")
        _deliver(engine, "a", offer, model(1 + offer.round))
    assert run.summary().completed
    received += [b"".join(parts) for _, parts in stream]
    assert len(received) > 2
    assert payload_digest(b"".join(received)) == first.payload.info.blake3
