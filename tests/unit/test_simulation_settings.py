"""Simulation settings and worker placement: which device each worker trains on, and the
settings a simulation refuses before it starts."""

from __future__ import annotations

from typing import Any

import pytest

from fedlink.common.errors import ConfigError
from fedlink.simulation.app import client_settings
from fedlink.simulation.config import SimulationConfig, client_name
from fedlink.simulation.workers import plan_workers


def test_workers_are_pinned_to_the_gpus_in_turn() -> None:
    plan = plan_workers(workers=5, device="cuda", workers_per_gpu=1, threads=1, gpus=2, cpus=16)
    assert plan.devices == ("cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0")


def test_automatic_workers_are_workers_per_gpu_on_each_gpu_or_one_per_cpu() -> None:
    on_gpus = plan_workers(workers=0, device="auto", workers_per_gpu=3, threads=1, gpus=2, cpus=16)
    assert on_gpus.devices == ("cuda:0", "cuda:1") * 3
    on_cpus = plan_workers(workers=0, device="auto", workers_per_gpu=3, threads=2, gpus=0, cpus=7)
    assert on_cpus.devices == ("cpu",) * 3 and on_cpus.threads == 2
    forced = plan_workers(workers=0, device="cpu", workers_per_gpu=1, threads=1, gpus=4, cpus=2)
    assert forced.devices == ("cpu", "cpu")


def test_cuda_without_a_gpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        plan_workers(workers=0, device="cuda", workers_per_gpu=1, threads=1, gpus=0, cpus=2)


def test_client_names_sort_in_index_order() -> None:
    assert client_name(7, 10) == "client-7"
    assert client_name(7, 10_000) == "client-0007"
    names = [client_name(i, 1000) for i in range(1000)]
    assert sorted(names) == names


def test_a_simulation_needs_no_certificates() -> None:
    config = SimulationConfig(num_clients=100, fraction_fit=0.1)
    assert config.cert is None and not config.insecure


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"num_clients": 3, "min_fit_clients": 4}, "num_clients 3 is below"),
        ({"partition": "dirichlet:-1"}, "alpha must be a positive number"),
        ({"device": "tpu"}, "device must be one of"),
        ({"workers": -1}, "workers must be >= 0"),
        ({"secure_aggregation": True, "min_fit_clients": 3}, "secure aggregation is not"),
        ({"dpsgd_noise_multiplier": 1.0}, "DP-SGD is not simulated"),
        ({"dashboard_listen": "127.0.0.1:0"}, "serves no dashboard"),
        ({"strategy": "nowhere.module:Strategy"}, "nowhere"),
        (
            {"strategy": "scaffold", "momentum": 0.0, "backend": "ray"},
            "Ray workers on other machines cannot reach",
        ),
    ],
)
def test_settings_a_simulation_cannot_run_are_refused(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(**settings)


def test_virtual_clients_get_the_strategys_settings_with_the_tasks() -> None:
    config = SimulationConfig(
        strategy="fedprox", strategy_params={"mu": 0.5}, task_config={"threshold": 2}
    )
    assert client_settings(config).task_config == {"threshold": 2, "fedlink.proximal_mu": 0.5}
