"""Client-side decisions that need no network: device choice, the coordinator's settings, backoff."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from fedlink.client import app
from fedlink.client.config import ClientConfig
from fedlink.client.connection import Backoff
from fedlink.client.settings import FatalClientError, task_settings_from, train_config_from
from fedlink.client.site import pick_device
from fedlink.common.errors import ConfigError, TensorFormatError
from fedlink.common.task_settings import check_task_settings
from fedlink.common.tasks.base import DPSGDConfig
from fedlink.v1 import federation_pb2 as pb


def test_auto_device_is_cuda_only_when_cuda_exists() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto").type == expected
    assert pick_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_insisting_on_cuda_without_a_gpu_is_a_clear_error() -> None:
    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="no CUDA device"):
            pick_device(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_numbered_gpu_is_used_and_one_beyond_the_machines_is_refused() -> None:
    count = torch.cuda.device_count()
    assert pick_device(f"cuda:{count - 1}") == torch.device(f"cuda:{count - 1}")
    with pytest.raises(ConfigError, match=f"has {count} CUDA device"):
        pick_device(f"cuda:{count}")


def test_training_settings_from_the_coordinator_are_parsed() -> None:
    config = train_config_from(
        {"local_epochs": "2", "batch_size": "16", "learning_rate": "0.05", "momentum": "0.5"},
        seed=7,
    )
    assert (config.local_epochs, config.batch_size, config.seed) == (2, 16, 7)
    assert (config.learning_rate, config.momentum) == (0.05, 0.5)
    assert (config.optimizer, config.weight_decay) == ("sgd", 0.0)  # an older coordinator


def test_weight_decay_and_optimizer_from_the_coordinator_are_parsed() -> None:
    config = train_config_from({"weight_decay": "0.0005", "optimizer": "adamw"}, seed=0)
    assert (config.optimizer, config.weight_decay) == ("adamw", 0.0005)


def test_the_task_settings_of_a_header_reach_the_train_config() -> None:
    header = pb.TaskHeader()
    header.task_config["mu"].number = 0.01
    header.task_config["mode"].text = "fast"
    header.task_config["layers"].integer = 3
    header.task_config["centered"].flag = True
    config = train_config_from({}, seed=0, settings=task_settings_from(header))
    assert dict(config.task_config) == {"mu": 0.01, "mode": "fast", "layers": 3, "centered": True}


def test_fedprox_mu_reaches_training_and_not_the_tasks_own_settings() -> None:
    header = pb.TaskHeader()
    header.task_config["fedlink.proximal_mu"].number = 0.25
    header.task_config["mode"].text = "fast"
    config = train_config_from({}, seed=0, settings=task_settings_from(header))
    assert config.proximal_mu == 0.25
    assert dict(config.task_config) == {"mode": "fast"}
    assert train_config_from({}, seed=0).proximal_mu == 0.0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("fedlink.proximal_mu", -1.0, "out-of-range FedProx mu"),
        ("fedlink.proximal_mu", 1e9, "out-of-range FedProx mu"),
        ("fedlink.proximal_mu", "0.1", "out-of-range FedProx mu"),
        ("fedlink.proximal_mu", True, "out-of-range FedProx mu"),
        ("fedlink.control_variates", 1, "does not know \\(fedlink.control_variates\\)"),
    ],
)
def test_hostile_or_unknown_strategy_settings_are_refused(
    name: str, value: object, message: str
) -> None:
    with pytest.raises(FatalClientError, match=message):
        train_config_from({}, seed=0, settings=check_task_settings({name: value}))


def test_hostile_task_settings_in_a_header_are_refused() -> None:
    empty = pb.TaskHeader()
    empty.task_config["nothing"].CopyFrom(pb.SettingValue())
    with pytest.raises(FatalClientError, match=r"invalid task settings: .*'nothing' has no value"):
        task_settings_from(empty)
    flood = pb.TaskHeader()
    for i in range(65):
        flood.task_config[f"k{i}"].integer = i
    with pytest.raises(FatalClientError, match="at most 64"):
        task_settings_from(flood)
    long = pb.TaskHeader()
    long.task_config["text"].text = "x" * 5000
    with pytest.raises(FatalClientError, match="at most 1024"):
        task_settings_from(long)
    odd_name = pb.TaskHeader()
    odd_name.task_config["../x"].integer = 1
    with pytest.raises(FatalClientError, match=r"name '\.\./x'"):
        task_settings_from(odd_name)
    infinite = pb.TaskHeader()
    infinite.task_config["x"].number = float("inf")
    with pytest.raises(FatalClientError, match="not a finite number"):
        task_settings_from(infinite)


@pytest.mark.parametrize(
    "settings",
    [
        {"local_epochs": "many"},
        {"local_epochs": "0"},
        {"local_epochs": "1000000"},
        {"batch_size": "0"},
        {"learning_rate": "nan"},
        {"learning_rate": "-1"},
        {"learning_rate": "inf"},
        {"momentum": "1.0"},
        {"weight_decay": "-0.1"},
        {"weight_decay": "nan"},
        {"weight_decay": "2"},
        {"optimizer": "lbfgs"},
        {"optimizer": "__import__('os')"},
    ],
)
def test_hostile_training_settings_are_refused(settings: dict[str, str]) -> None:
    with pytest.raises(FatalClientError, match="coordinator sent"):
        train_config_from(settings, seed=0)


def test_dpsgd_settings_from_the_coordinator_are_parsed() -> None:
    assert train_config_from({}, seed=0).dpsgd is None
    config = train_config_from(
        {"dpsgd_noise_multiplier": "1.1", "dpsgd_max_grad_norm": "0.5", "dpsgd_delta": "1e-06"},
        seed=0,
    )
    assert config.dpsgd == DPSGDConfig(noise_multiplier=1.1, max_grad_norm=0.5, delta=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        {"dpsgd_noise_multiplier": "0"},
        {"dpsgd_noise_multiplier": "-1"},
        {"dpsgd_noise_multiplier": "nan"},
        {"dpsgd_noise_multiplier": "inf"},
        {"dpsgd_noise_multiplier": "lots"},
        {"dpsgd_noise_multiplier": "1", "dpsgd_max_grad_norm": "0"},
        {"dpsgd_noise_multiplier": "1", "dpsgd_max_grad_norm": "inf"},
        {"dpsgd_noise_multiplier": "1", "dpsgd_delta": "0"},
        {"dpsgd_noise_multiplier": "1", "dpsgd_delta": "1"},
        {"dpsgd_noise_multiplier": "1", "dpsgd_delta": "nan"},
    ],
)
def test_hostile_dpsgd_settings_are_refused(settings: dict[str, str]) -> None:
    with pytest.raises(FatalClientError, match="coordinator sent malformed training settings"):
        train_config_from(settings, seed=0)


def test_backoff_delays_grow_with_jitter_and_give_up_after_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    delays: list[float] = []
    monkeypatch.setattr(time, "sleep", delays.append)
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    backoff = Backoff(initial=1.0, maximum=8.0, give_up_after=100.0)
    for _ in range(6):
        assert backoff.wait("down")
        clock[0] += 10
    caps = [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert all(0 <= d <= cap for d, cap in zip(delays, caps, strict=True))
    assert len(set(delays)) > 1  # jittered, so restarted clients do not reconnect in lockstep
    clock[0] += 100
    assert not backoff.wait("still down")
    backoff.reset()
    assert backoff.wait("down again")


class _InterruptedWhileLoading:
    """Stands in for FederationClient: SIGTERM arrives while a library works, and the library
    turns the interruption into an error of its own: safetensors reading the global model, or
    Python defining a class during torch's lazy import of torch._dynamo (a RuntimeError)."""

    rewrap: type[BaseException] = TensorFormatError

    def __init__(self, config: object) -> None:
        pass

    def run(self) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in here
        except app.ShutdownRequested as exc:
            raise self.rewrap("interrupted") from exc
        raise AssertionError("SIGTERM was not delivered")


@pytest.mark.parametrize("rewrap", [TensorFormatError, RuntimeError])
def test_a_shutdown_signal_exits_cleanly_even_when_a_library_rewraps_it(
    monkeypatch: pytest.MonkeyPatch, rewrap: type[BaseException]
) -> None:
    monkeypatch.setattr(_InterruptedWhileLoading, "rewrap", rewrap)
    monkeypatch.setattr(app, "FederationClient", _InterruptedWhileLoading)
    assert app.run_client(ClientConfig(insecure=True)) == 0
    assert signal.getsignal(signal.SIGTERM) is not app._raise_shutdown  # handlers restored


def test_an_error_without_a_shutdown_signal_still_propagates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class _Crashes(_InterruptedWhileLoading):
        def run(self) -> int:
            raise RuntimeError("the task's own bug")

    monkeypatch.setattr(app, "FederationClient", _Crashes)
    with pytest.raises(RuntimeError, match="own bug"):
        app.run_client(ClientConfig(insecure=True))
