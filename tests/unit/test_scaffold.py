"""SCAFFOLD (Karimireddy et al. 2020, option II) against steps worked out by hand: the client's
corrected SGD steps and control-variate update, the server's updates of x and c, its checkpointed
state, and the settings it refuses to run with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.client.settings import FatalClientError, checked_control, train_config_from
from fedlink.common.errors import ConfigError
from fedlink.common.scaffold import CONTROL_DELTA, SERVER_CONTROL, next_client_control
from fedlink.common.tasks.base import ClientData, ControlCorrection, TensorExamples, TrainConfig
from fedlink.common.tasks.training import train_regressor
from fedlink.common.tensors import manifest_of, open_state_file, save_state_file
from fedlink.server.config import ServerConfig
from fedlink.server.rounds import RoundEngine
from fedlink.server.scaffold import Scaffold
from fedlink.server.strategy import aggregate_files, next_global


def test_the_client_takes_corrected_sgd_steps_and_updates_its_control_variate() -> None:
    # One weight w, one example (feature 1, target 0): loss w^2, gradient 2w. lr 0.1, two
    # steps, c = 0.5, c_i = 0.2, so every step uses g + (c - c_i) = g + 0.3:
    #   w1 = 1 - 0.1 (2 + 0.3) = 0.77;  w2 = 0.77 - 0.1 (1.54 + 0.3) = 0.586
    # option II: c_i+ = c_i - c + (x - y) / (K lr) = 0.2 - 0.5 + 0.414 / 0.2 = 1.77
    # (the mean of the raw gradients 2 and 1.54), Delta c_i = 1.57.
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    start = {"weight": model.weight.detach().clone()}
    server = {"weight": torch.tensor([[0.5]])}
    client = {"weight": torch.tensor([[0.2]])}
    control = ControlCorrection({"weight": server["weight"] - client["weight"]})
    data = ClientData(TensorExamples(torch.ones(1, 1), torch.zeros(1, 1)))
    config = TrainConfig(
        local_epochs=2, batch_size=1, learning_rate=0.1, momentum=0.0, scaffold=control
    )
    train_regressor(model, data, config, torch.device("cpu"))
    assert control.steps == 2
    assert model.weight.item() == pytest.approx(0.586, abs=1e-6)
    new, delta = next_client_control(
        client=client,
        server=server,
        start=start,
        trained={"weight": model.weight.detach()},
        steps=control.steps,
        learning_rate=0.1,
        stepped=frozenset(control.correction),
    )
    assert new["weight"].item() == pytest.approx(1.77, abs=1e-5)
    assert delta["weight"].item() == pytest.approx(1.57, abs=1e-5)


def test_tensors_no_sgd_step_moves_keep_their_control_variate() -> None:
    zeros = {"running_mean": torch.zeros(2)}
    new, delta = next_client_control(
        client={"running_mean": torch.tensor([1.0, 2.0])},
        server=zeros,
        start=zeros,
        trained={"running_mean": torch.tensor([5.0, 5.0])},
        steps=3,
        learning_rate=0.1,
        stepped=frozenset(),
    )
    assert new["running_mean"].tolist() == [1.0, 2.0]
    assert delta["running_mean"].tolist() == [0.0, 0.0]


def _update(tmp_path: Path, name: str, w: list[float], delta_c: list[float]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_state_file(
        {
            "w": torch.tensor(w),
            "n": torch.tensor(7),
            CONTROL_DELTA + "w": torch.tensor(delta_c),
        },
        path,
    )
    return path


def test_the_server_moves_x_by_eta_g_and_c_by_the_share_of_clients_that_reported(
    tmp_path: Path,
) -> None:
    # x = [1, -2]; y_1 = [2, 0] (weight 1), y_2 = [0, 2] (weight 3): mean y = [0.5, 1.5];
    # eta_g = 0.5: x <- x + 0.5 (mean y - x) = [0.75, -0.25].
    # Delta c_1 = [1, 2], Delta c_2 = [-1, 2]: weighted mean [-0.5, 2]; |S| = 2 of N = 4:
    # c <- 0 + (2 / 4) [-0.5, 2] = [-0.25, 1].
    global_state = {"w": torch.tensor([1.0, -2.0]), "n": torch.tensor(5)}
    save_state_file(global_state, tmp_path / "global.safetensors")
    strategy = Scaffold(eta=0.5)
    manifest = manifest_of(global_state)
    download = strategy.download_tensors(manifest)
    assert download.keys() == {SERVER_CONTROL + "w"} and not download[SERVER_CONTROL + "w"].any()
    assert strategy.upload_manifest(manifest) == {CONTROL_DELTA + "w": manifest["w"]}
    strategy.set_population(4)
    updates = [
        (1.0, _update(tmp_path, "a", [2.0, 0.0], [1.0, 2.0])),
        (3.0, _update(tmp_path, "b", [0.0, 2.0], [-1.0, 2.0])),
    ]
    aggregate = aggregate_files(strategy, tmp_path / "global.safetensors", updates, manifest)
    new = next_global(strategy, tmp_path / "global.safetensors", aggregate, 1)
    assert new is not None
    assert new["w"].tolist() == pytest.approx([0.75, -0.25])
    assert int(new["n"]) == 7  # counters: the median, as under FedAvg
    assert strategy.control["w"].tolist() == pytest.approx([-0.25, 1.0])
    assert strategy.download_tensors(manifest)[SERVER_CONTROL + "w"].tolist() == pytest.approx(
        [-0.25, 1.0]
    )

    # c is the checkpointed state: a resumed strategy holds exactly the same c and takes the
    # same next step.
    save_state_file(strategy.state_dict(), tmp_path / "state.safetensors")
    resumed = Scaffold(eta=0.5)
    with open_state_file(tmp_path / "state.safetensors") as state:
        resumed.load_state_dict(state)
    assert torch.equal(resumed.control["w"], strategy.control["w"])
    save_state_file(new, tmp_path / "global.safetensors")
    for each in (strategy, resumed):
        each.set_population(4)
        aggregate = aggregate_files(each, tmp_path / "global.safetensors", updates, manifest)
        assert next_global(each, tmp_path / "global.safetensors", aggregate, 2) is not None
    assert torch.equal(resumed.control["w"], strategy.control["w"])
    assert strategy.control["w"].tolist() == pytest.approx([-0.5, 2.0])


def _config(**settings: Any) -> ServerConfig:
    return ServerConfig(insecure=True, strategy="scaffold", **settings)


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({}, 'set optimizer = "sgd" and momentum = 0'),
        ({"momentum": 0.0, "optimizer": "adam"}, "optimizer = 'adam'"),
        (
            {"momentum": 0.0, "secure_aggregation": True, "min_fit_clients": 3},
            "secure_aggregation (the coordinator must add up each client's Delta c_i",
        ),
        ({"momentum": 0.0, "dp_clip_norm": 1.0}, "dp_clip_norm (DP-FedAvg clips and noises"),
        ({"momentum": 0.0, "dpsgd_noise_multiplier": 1.0}, "dpsgd_noise_multiplier (the control"),
        (
            {"momentum": 0.0, "aggregation": "median", "min_results": 3, "min_fit_clients": 3},
            "aggregation = 'median' (SCAFFOLD's updates of x and c are means)",
        ),
        ({"momentum": 0.0, "update_codec": "fp16"}, "update codec 'fp16' (codecs encode the model"),
        ({"momentum": 0.0, "strategy_params": {"eta": 0.0}}, "must be positive"),
    ],
)
def test_scaffold_is_refused_at_start_up_where_it_cannot_run(
    settings: dict[str, Any], says: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        _config(**settings)
    assert says in str(refused.value)


def test_scaffold_runs_with_plain_sgd_and_sends_its_setting() -> None:
    config = _config(momentum=0.0, strategy_params={"eta": 0.8})
    strategy = config.build_strategy()
    assert repr(strategy) == "scaffold(eta=0.8)"
    assert config.task_settings(strategy)["fedlink.scaffold"] is True


@pytest.mark.parametrize(
    ("hyper", "settings", "says"),
    [
        ({"momentum": "0.9"}, {"fedlink.scaffold": True}, "SCAFFOLD needs plain SGD steps"),
        ({"optimizer": "adam"}, {"fedlink.scaffold": True}, "SCAFFOLD needs plain SGD steps"),
        ({"momentum": "0"}, {"fedlink.scaffold": "yes"}, "it must be a boolean"),
    ],
)
def test_a_client_refuses_scaffold_settings_it_cannot_train_with(
    hyper: dict[str, str], settings: dict[str, Any], says: str
) -> None:
    with pytest.raises(FatalClientError, match=says):
        train_config_from(hyper, seed=0, settings=settings)
    assert train_config_from({"momentum": "0"}, 0, {"fedlink.scaffold": True}).momentum == 0


@pytest.mark.parametrize(
    "control",
    [
        {},  # the setting on, no c in the download
        {"w": torch.zeros(3), "extra": torch.zeros(1)},  # c for a tensor the model lacks
        {"w": torch.zeros(4)},  # another shape
        {"w": torch.zeros(3, dtype=torch.int64)},  # not floating
        {"w": torch.tensor([0.0, float("nan"), 0.0])},
    ],
)
def test_a_client_refuses_control_variates_that_do_not_fit_its_model(
    control: dict[str, torch.Tensor],
) -> None:
    model = {"w": torch.zeros(3), "counter": torch.tensor(1)}
    with pytest.raises(FatalClientError, match="SCAFFOLD control variate"):
        checked_control(control, model)
    assert checked_control({"w": torch.ones(3)}, model)["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_model_with_tensors_under_the_reserved_prefix_is_refused_at_start_up(
    tmp_path: Path,
) -> None:
    config = _config(momentum=0.0, state_dir=tmp_path / "state", run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"the model has tensors named fedlink\.scaffold\.c/w"):
        RoundEngine(config, {"fedlink.scaffold.c/w": torch.zeros(2), "w": torch.zeros(2)})
    RoundEngine(config, {"w": torch.zeros(2)})  # starts
