"""Strategies in real federations (a coordinator and client processes over mTLS): every built-in
strategy, a server optimizer and FedProx over secure aggregation, SCAFFOLD's control variates,
and the custom strategy of docs/strategies.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch
from conftest import wait_for_file
from test_federation_run import _client, _kill_all, _log, _server, _start_federation

from fedlink.common.tasks import load_task
from fedlink.common.tensors import encode_state, open_state_file
from fedlink.common.wire import payload_digest
from fedlink.server.validation import non_finite_tensors
from fedlink.v1 import federation_pb2 as pb

DOC = Path(__file__).resolve().parents[2] / "docs" / "strategies.md"


def _run(
    pki: Any,
    tmp_path: Path,
    rounds: int,
    clients: int,
    env: dict[str, str] | None = None,
    **settings: object,
) -> list[dict[str, Any]]:
    """A whole federation; the metrics.jsonl records once it finished cleanly."""
    server, processes, run_dir = _start_federation(
        pki, tmp_path, rounds=rounds, clients=clients, env=env, **settings
    )
    try:
        assert server.wait(timeout=300) == 0, _log(tmp_path, "run")
        for process in processes:
            assert process.wait(timeout=60) == 0
    finally:
        _kill_all([server, *processes])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["round"] for r in records] == list(range(1, rounds + 1))
    assert all(r["clients_accepted"] == clients for r in records)
    with open_state_file(run_dir / "final_model.safetensors") as state:
        assert non_finite_tensors(state) == []
    return records


@pytest.mark.parametrize(
    ("strategy", "params", "announced"),
    [
        ("fedavg", None, "strategy: fedavg"),
        ("fedavgm", "eta=1.0,beta=0.5", "strategy: fedavgm(eta=1, beta=0.5) over fedavg"),
        ("fedadam", "eta=0.01", "strategy: fedadam(eta=0.01, beta1=0.9, beta2=0.99, tau=0.001)"),
        ("fedyogi", "eta=0.01", "strategy: fedyogi(eta=0.01, beta1=0.9, beta2=0.99, tau=0.001)"),
        ("fedadagrad", "eta=0.01", "strategy: fedadagrad(eta=0.01, beta1=0.9, tau=0.001)"),
    ],
)
def test_each_built_in_strategy_runs_a_federation(
    pki: Any, tmp_path: Path, strategy: str, params: str | None, announced: str
) -> None:
    settings: dict[str, object] = {"strategy": strategy}
    if params is not None:
        settings["strategy_params"] = params
    records = _run(pki, tmp_path, rounds=2, clients=2, **settings)
    assert records[-1]["federated_accuracy"] is not None
    assert announced in _log(tmp_path, "run")


def test_a_server_optimizer_steps_on_the_mean_secure_aggregation_reveals(
    pki: Any, tmp_path: Path
) -> None:
    (tmp_path / "server.toml").write_text('strategy = "fedadam"\nsecure_aggregation = true\n')
    _run(pki, tmp_path, rounds=2, clients=3, config=tmp_path / "server.toml")
    log = _log(tmp_path, "run")
    assert "strategy: fedadam(" in log
    assert "secure aggregation recovered the sum of 3 of 3 clients" in log
    checkpoints = sorted((tmp_path / "run-state" / "checkpoints").glob("*.strategy.safetensors"))
    assert checkpoints, "the optimizer's moments go into every checkpoint"
    with open_state_file(checkpoints[-1]) as moments:
        assert {name.split("/")[0] for name in moments} == {"m", "v"}
        assert all(bool(torch.isfinite(t).all()) for t in moments.values())


def test_fedprox_clients_train_with_the_coordinators_mu_under_secure_aggregation(
    pki: Any, tmp_path: Path
) -> None:
    (tmp_path / "server.toml").write_text(
        'strategy = "fedprox"\nsecure_aggregation = true\n\n[strategy_params]\nmu = 0.1\n'
    )
    records = _run(pki, tmp_path, rounds=2, clients=3, config=tmp_path / "server.toml")
    assert records[-1]["federated_accuracy"] is not None
    log = _log(tmp_path, "run")
    assert "strategy: fedprox(mu=0.1) over fedavg" in log
    assert "secure aggregation recovered the sum of 3 of 3 clients" in log
    for site in range(3):
        client_log = _log(tmp_path, f"site-{site}")
        assert client_log.count("(FedProx proximal term mu=0.1)") == 2, client_log


def test_the_custom_strategy_of_the_docs_runs_in_a_federation(pki: Any, tmp_path: Path) -> None:
    text = DOC.read_text()
    (module,) = re.findall(r'^```python\n("""capped\.py.*?)^```$', text, re.MULTILINE | re.DOTALL)
    (config,) = re.findall(r'^```\n(strategy = "capped:.*?)^```$', text, re.MULTILINE | re.DOTALL)
    code_dir = tmp_path / "code"
    code_dir.mkdir()
    (code_dir / "capped.py").write_text(module)
    (tmp_path / "server.toml").write_text(config)
    records = _run(
        pki,
        tmp_path,
        rounds=2,
        clients=2,
        env={"PYTHONPATH": str(code_dir)},
        config=tmp_path / "server.toml",
    )
    assert records[-1]["federated_accuracy"] is not None
    log = _log(tmp_path, "run")
    assert "strategy: capped-fedavg" in log
    # Each digits client holds about 900 examples, over the cap of 300 the docs set.
    assert log.count("capped-fedavg: 2 site(s) capped at 300 examples") == 2


def test_scaffold_clients_keep_their_control_variates_and_the_coordinator_checkpoints_c(
    pki: Any, tmp_path: Path
) -> None:
    clients = 2
    server = _server(
        pki,
        tmp_path,
        "run",
        listen="127.0.0.1:0",
        address_file=tmp_path / "address",
        num_rounds=2,
        min_clients=clients,
        min_fit_clients=clients,
        strategy="scaffold",
        momentum=0,
    )
    processes: list[Any] = [server]
    try:
        address = wait_for_file(tmp_path / "address", server)
        processes += [
            _client(
                pki,
                tmp_path,
                f"site-{i}",
                address,
                partition="classes:2",
                partition_index=i,
                num_partitions=clients,
                state_dir=tmp_path / f"site-{i}-state",
            )
            for i in range(clients)
        ]
        assert server.wait(timeout=300) == 0, _log(tmp_path, "run")
        for process in processes[1:]:
            assert process.wait(timeout=60) == 0
    finally:
        _kill_all(processes)
    assert "strategy: scaffold(eta=1)" in _log(tmp_path, "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["clients_accepted"] for r in records] == [clients, clients]
    # The published model holds the model only; c is the checkpointed strategy state.
    with open_state_file(tmp_path / "run" / "final_model.safetensors") as final:
        assert not [name for name in final if name.startswith("fedlink.")]
    checkpoints = tmp_path / "run-state" / "checkpoints"
    with open_state_file(sorted(checkpoints.glob("*.strategy.safetensors"))[-1]) as state:
        assert state and all(name.startswith("c/") for name in state)
        assert any(bool(c.abs().sum() > 0) for c in state.values())
        assert all(bool(torch.isfinite(c).all()) for c in state.values())
    assert not list((tmp_path / "run-state").glob("task-*"))  # round payloads are cleaned up
    for i in range(clients):
        (control,) = (tmp_path / f"site-{i}-state").glob("scaffold-control-*.safetensors")
        with open_state_file(control) as c_i:
            assert any(bool(t.abs().sum() > 0) for t in c_i.values())
        assert _log(tmp_path, f"site-{i}").count("SCAFFOLD control variate updated after") == 2


def test_scaffold_sends_c_with_the_model_and_refuses_an_update_without_delta_c(
    pki: Any, start_coordinator: Any
) -> None:
    initial = load_task("digits").build_model().state_dict()
    coordinator = start_coordinator(
        initial,
        strategy="scaffold",
        momentum=0.0,
        num_rounds=1,
        min_clients=1,
        min_fit_clients=1,
        evaluate_every=0,
    )
    stub = coordinator.stub(pki, "probe")
    stub.Join(pb.JoinRequest(), timeout=10)
    messages = list(stub.PullTask(pb.PullTaskRequest(), timeout=30))
    task = messages[0].header
    assert task.task_config["fedlink.scaffold"].flag is True
    sent = safetensors.torch.load(b"".join(m.chunk.data for m in messages[1:]))
    control = {name for name in sent if name.startswith("fedlink.scaffold.c/")}
    assert control == {f"fedlink.scaffold.c/{name}" for name in initial}
    assert all(not sent[name].any() for name in control)  # c starts at 0
    model = {name: sent[name] for name in initial}
    payload = encode_state(model)  # what a client without SCAFFOLD would send
    header = pb.ResultHeader(task_id=task.task_id, round=task.round, num_examples=1)
    header.payload.CopyFrom(
        pb.PayloadInfo(size=len(payload), blake3=payload_digest(payload), encoding="safetensors")
    )
    chunks = [pb.ResultMessage(chunk=pb.Chunk(offset=0, data=payload))]
    with pytest.raises(grpc.RpcError) as refused:
        stub.PushResult(iter([pb.ResultMessage(header=header), *chunks]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs 4 extra tensor(s) with every update" in (refused.value.details() or "")
    coordinator.stop.set()
