"""`fedlink simulate`: virtual clients on a worker pool give the model a real mTLS federation of
the same task, strategy, clients and seed gives, bit for bit; a task that fails stops it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from conftest import fedlink_process, wait_for_file

from fedlink.main import main
from fedlink.simulation.config import client_name

TASKS_DIR = Path(__file__).parent / "tasks"
CLIENTS = 3
# The federation both runtimes run: 3 clients, 2 sampled a round (seeded), FedAvg on digits.
FEDERATION = {
    "task": "digits",
    "num_rounds": 2,
    "min_clients": CLIENTS,
    "fraction_fit": 0.5,
    "min_fit_clients": 2,
    "seed": 7,
    "local_epochs": 2,
    "batch_size": 16,
    "evaluate_every": 1,
}


def _flags(**values: object) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]


def _simulate(tmp: Path, name: str, env: dict[str, str] | None = None, **settings: object) -> Any:
    """`fedlink simulate` as a real process; its run directory is tmp/name."""
    arguments = [
        "simulate",
        *_flags(
            **{
                **FEDERATION,
                "num_clients": CLIENTS,
                "workers": 2,
                "run_dir": tmp / name,
                "state_dir": tmp / f"{name}-state",
                **settings,
            }
        ),
    ]
    return fedlink_process(arguments, tmp / f"{name}.log", env)


def _model(run_dir: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(run_dir / "final_model.safetensors"))


@pytest.mark.parametrize(
    "strategy",
    [
        {},
        # The virtual clients keep their control variates on disk between rounds, the real ones
        # in memory: the same c_i either way.
        {"strategy": "scaffold", "momentum": 0},
    ],
    ids=["fedavg", "scaffold"],
)
def test_a_seeded_simulation_ends_with_the_model_of_the_same_federation_over_mtls(
    pki: Any, tmp_path: Path, strategy: dict[str, object]
) -> None:
    simulation = _simulate(tmp_path, "sim", **strategy)
    bundle = pki.server_dir
    address_file = tmp_path / "address"
    server = fedlink_process(
        [
            "server",
            *_flags(
                cert=bundle / "server.pem",
                key=bundle / "server.key",
                ca=bundle / "ca.pem",
                listen="127.0.0.1:0",
                address_file=address_file,
                heartbeat_interval_seconds=1,
                run_dir=tmp_path / "real",
                state_dir=tmp_path / "real-state",
                **FEDERATION,
                **strategy,
            ),
        ],
        tmp_path / "server.log",
    )
    clients = []
    try:
        address = wait_for_file(address_file, server)
        for index in range(CLIENTS):
            # The sites carry the virtual clients' names, data parts and thread count.
            name = client_name(index, CLIENTS)
            cert, key, ca = pki.client(name)
            arguments = _flags(
                server=address,
                cert=cert,
                key=key,
                ca=ca,
                task="digits",
                partition="iid",
                partition_index=index,
                num_partitions=CLIENTS,
                seed=FEDERATION["seed"],
                threads=1,
            )
            clients.append(fedlink_process(["client", *arguments], tmp_path / f"{name}.log"))
        assert server.wait(timeout=300) == 0, (tmp_path / "server.log").read_text()
        assert simulation.wait(timeout=300) == 0, (tmp_path / "sim.log").read_text()
    finally:
        for process in (server, simulation, *clients):
            if process.poll() is None:
                process.kill()
                process.wait()
    simulated, real = _model(tmp_path / "sim"), _model(tmp_path / "real")
    assert simulated.keys() == real.keys()
    for name, tensor in real.items():
        assert torch.equal(simulated[name], tensor), name
    # The same records too: who took part, and what they reported.
    rows = [
        [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("sim", "real")
    ]
    keys = ("round", "clients_sampled", "clients_accepted", "train_loss", "federated_accuracy")
    assert [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]]
    assert (tmp_path / "sim" / "accuracy.png").exists()
    if strategy:
        kept = list((tmp_path / "sim-state" / "clients").glob("scaffold-control-*.safetensors"))
        assert len(kept) == CLIENTS  # seed 7 samples every client at least once


def test_a_task_that_raises_stops_the_simulation_and_says_which_client(tmp_path: Path) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")]),
        "FAULTY_TRAIN_ERROR": "the site's disk is unreadable",
    }
    process = _simulate(tmp_path, "sim", env, task="faulty_digits_task", num_rounds=1)
    assert process.wait(timeout=120) == 1
    log = (tmp_path / "sim.log").read_text()
    assert "the site's disk is unreadable" in log
    assert "a virtual client's task failed: client-" in log


def test_bad_simulation_settings_are_refused_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--num-clients=1", "--min-clients=2"]) == 2
    assert "num_clients 1 is below min_clients" in capsys.readouterr().err


def test_the_ray_backend_on_a_two_node_cluster_ends_with_the_same_model(tmp_path: Path) -> None:
    ray_cluster = pytest.importorskip(
        "ray.cluster_utils", reason="Ray is not installed (pip install 'fedlink[ray]')"
    )
    psutil = pytest.importorskip("psutil")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster = ray_cluster.Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)  # one worker (1 CPU each) fits on each node
        cluster.wait_for_nodes()
        on_ray = _simulate(tmp_path, "ray", backend="ray", ray_address=cluster.address)
        locally = _simulate(tmp_path, "local")
        assert on_ray.wait(timeout=300) == 0, (tmp_path / "ray.log").read_text()
        assert locally.wait(timeout=300) == 0, (tmp_path / "local.log").read_text()
    finally:
        cluster.shutdown()
    assert "2 Ray workers" in (tmp_path / "ray.log").read_text()
    on_ray_model, local_model = _model(tmp_path / "ray"), _model(tmp_path / "local")
    for name, tensor in local_model.items():
        assert torch.equal(on_ray_model[name], tensor), name
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and p.is_running()
    ]
    assert left == [], f"Ray left processes behind: {[p.cmdline()[:2] for p in left]}"
