"""Strategies in real federations (a coordinator and client processes over mTLS): every built-in
strategy, a server optimizer and FedProx over secure aggregation, and the custom strategy of
docs/strategies.md."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from test_federation_run import _kill_all, _log, _start_federation

from fedlink.common.tensors import open_state_file
from fedlink.server.validation import non_finite_tensors

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
