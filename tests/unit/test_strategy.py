"""The Strategy API: server optimizers against hand-computed steps of their papers' update rules,
loading strategies from settings, and the checks on what a step may publish."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from fedlink.common.config import load_config
from fedlink.common.errors import ConfigError
from fedlink.common.tensors import StateDict, manifest_of, save_state_file
from fedlink.common.wire import PayloadFile
from fedlink.server.checkpoints import Checkpoint, check_resumable, run_identity
from fedlink.server.config import ServerConfig
from fedlink.server.optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi, ServerOptimizer
from fedlink.server.strategy import (
    FedAvg,
    FedProx,
    RuleStrategy,
    Strategy,
    aggregate_files,
    next_global,
)

sqrt = math.sqrt

# Round 1 moves the global model x0 by Delta1, round 2 by Delta2; the counter is an integer
# buffer, which takes the aggregate's value.
X0 = [1.0, -2.0, 0.0]
DELTA1 = [0.5, 0.0, 0.2]
DELTA2 = [-1.0, 1.0, 0.0]


def _model(values: list[float], steps: int = 0) -> StateDict:
    return {"w": torch.tensor(values, dtype=torch.float64), "steps": torch.tensor(steps)}


def _two_steps(optimizer: ServerOptimizer, x1_expected: list[float]) -> list[float]:
    """Step from X0 by DELTA1 (checked against `x1_expected`), then by DELTA2; x2."""
    x0 = _model(X0)
    x1 = optimizer.step(x0, _model([x + d for x, d in zip(X0, DELTA1, strict=True)], steps=3))
    assert x1["w"].tolist() == pytest.approx(x1_expected, abs=1e-12)
    assert int(x1["steps"]) == 3
    aggregate = _model([x + d for x, d in zip(x1["w"].tolist(), DELTA2, strict=True)], steps=4)
    return list(optimizer.step(x1, aggregate)["w"].tolist())


def test_fedavgm_steps_along_the_momentum_of_the_pseudo_gradient() -> None:
    # v1 = Delta1 = [0.5, 0, 0.2]; x1 = x0 + 0.5 v1
    # v2 = 0.5 v1 + Delta2 = [-0.75, 1, 0.1]; x2 = x1 + 0.5 v2
    x2 = _two_steps(FedAvgM(eta=0.5, beta=0.5), [1.25, -2.0, 0.1])
    assert x2 == pytest.approx([0.875, -1.5, 0.15], abs=1e-12)


def test_fedadam_follows_reddi_et_al_algorithm_2() -> None:
    # eta = 1, beta1 = beta2 = 0.5, tau = 0.5, m_-1 = 0, v_-1 = tau^2 = 0.25.
    # m1 = [0.25, 0, 0.1]; v1 = 0.5 * 0.25 + 0.5 * Delta1^2 = [0.25, 0.125, 0.145]
    x1 = [1 + 0.25 / (0.5 + 0.5), -2.0, 0.1 / (sqrt(0.145) + 0.5)]
    # m2 = 0.5 m1 + 0.5 Delta2 = [-0.375, 0.5, 0.05]; v2 = [0.625, 0.5625, 0.0725]
    x2 = _two_steps(FedAdam(eta=1.0, beta1=0.5, beta2=0.5, tau=0.5), x1)
    assert x2 == pytest.approx(
        [
            1.25 - 0.375 / (sqrt(0.625) + 0.5),
            -2.0 + 0.5 / (0.75 + 0.5),
            x1[2] + 0.05 / (sqrt(0.0725) + 0.5),
        ],
        abs=1e-12,
    )


def test_fedyogi_moves_the_second_moment_by_the_sign_of_its_gap() -> None:
    # v1 = v0 - 0.5 Delta1^2 sign(v0 - Delta1^2), v0 = 0.25, Delta1^2 = [0.25, 0, 0.04]:
    # signs [0, +1, +1] -> v1 = [0.25, 0.25, 0.23]; m1 = [0.25, 0, 0.1]
    x1 = [1 + 0.25 / (0.5 + 0.5), -2.0, 0.1 / (sqrt(0.23) + 0.5)]
    # Delta2^2 = [1, 1, 0]: signs [-1, -1, +1] -> v2 = [0.75, 0.75, 0.23]; m2 = [-0.375, 0.5, 0.05]
    x2 = _two_steps(FedYogi(eta=1.0, beta1=0.5, beta2=0.5, tau=0.5), x1)
    assert x2 == pytest.approx(
        [
            1.25 - 0.375 / (sqrt(0.75) + 0.5),
            -2.0 + 0.5 / (sqrt(0.75) + 0.5),
            x1[2] + 0.05 / (sqrt(0.23) + 0.5),
        ],
        abs=1e-12,
    )


def test_fedadagrad_sums_the_squared_pseudo_gradients() -> None:
    # v1 = 0.25 + Delta1^2 = [0.5, 0.25, 0.29]; m1 = [0.25, 0, 0.1]
    x1 = [1 + 0.25 / (sqrt(0.5) + 0.5), -2.0, 0.1 / (sqrt(0.29) + 0.5)]
    # v2 = v1 + Delta2^2 = [1.5, 1.25, 0.29]; m2 = [-0.375, 0.5, 0.05]
    x2 = _two_steps(FedAdagrad(eta=1.0, beta1=0.5, tau=0.5), x1)
    assert x2 == pytest.approx(
        [
            x1[0] - 0.375 / (sqrt(1.5) + 0.5),
            -2.0 + 0.5 / (sqrt(1.25) + 0.5),
            x1[2] + 0.05 / (sqrt(0.29) + 0.5),
        ],
        abs=1e-12,
    )


def test_a_server_optimizer_resumed_from_its_state_dict_steps_identically() -> None:
    x0 = {"w": torch.randn(5, generator=torch.Generator().manual_seed(1))}
    whole, first = FedAdam(), FedAdam()
    x1 = whole.step(x0, {"w": x0["w"] + 0.5})
    first.step(x0, {"w": x0["w"] + 0.5})
    resumed = FedAdam()
    resumed.load_state_dict({k: v.clone() for k, v in first.state_dict().items()})
    aggregate = {"w": x1["w"] - 0.25}
    assert torch.equal(whole.step(x1, aggregate)["w"], resumed.step(x1, aggregate)["w"])
    assert sorted(whole.state_dict()) == ["m/w", "v/w"]
    with pytest.raises(ValueError, match="fedadam has no state named 'velocity/w'"):
        resumed.load_state_dict({"velocity/w": torch.zeros(5)})


def test_half_precision_models_step_in_float32_and_keep_their_dtype() -> None:
    optimizer = FedAdam()
    x0 = {"w": torch.zeros(3, dtype=torch.float16)}
    new = optimizer.step(x0, {"w": torch.ones(3, dtype=torch.float16)})
    assert new["w"].dtype == torch.float16
    assert optimizer.state_dict()["m/w"].dtype == torch.float32


# ---- aggregation through the API ---------------------------------------------------------------


def test_fedavg_streams_each_update_from_its_file(tmp_path: Path) -> None:
    global_state = {"w": torch.zeros(2), "n": torch.tensor(0)}
    save_state_file(global_state, tmp_path / "global.safetensors")
    updates = []
    for i, (values, count) in enumerate([([1.0, 2.0], 5), ([4.0, -1.0], 3), ([0.0, 0.0], 1)]):
        path = tmp_path / f"u{i}.safetensors"
        save_state_file({"w": torch.tensor(values), "n": torch.tensor(count)}, path)
        updates.append((float(i + 1), path))
    result = aggregate_files(
        FedAvg(), tmp_path / "global.safetensors", updates, manifest_of(global_state)
    )
    # (1 * [1, 2] + 2 * [4, -1] + 3 * [0, 0]) / 6; counters: median of 0 (global), 5, 3, 1
    assert result["w"].tolist() == pytest.approx([1.5, 0.0])
    assert int(result["n"]) == 3


def _fedavg_round(strategy: Strategy, updates: list[StateDict]) -> StateDict:
    """One round of `strategy` over in-memory updates, each weighted by its position + 1."""
    strategy.begin(updates[0], manifest_of(updates[0]))
    for weight, update in enumerate(updates, start=1):
        strategy.accumulate(update, float(weight))
    return strategy.step(updates[0], strategy.finish())


def _updates(seed: int) -> list[StateDict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(1000, generator=generator), "n": torch.tensor(i)} for i in range(3)]


@pytest.mark.parametrize("make", [FedAvg, FedProx], ids=["fedavg", "fedprox"])
def test_fedavg_sums_into_the_memory_of_the_model_the_engine_released(
    make: type[Strategy],
) -> None:
    """Fresh memory costs more than the sums on some machines (docs/large-models.md): the
    released model's memory becomes the next round's accumulator, with the same result."""
    strategy, reference = make(), make()
    first = _fedavg_round(strategy, _updates(1))
    strategy.release(first)  # `first` stays referenced here only to see where `second` lies
    second = _fedavg_round(strategy, _updates(2))
    assert second["w"].data_ptr() == first["w"].data_ptr()
    assert torch.equal(second["w"], _fedavg_round(reference, _updates(2))["w"])


def test_only_the_tensors_fedavg_made_are_reused() -> None:
    # A server optimizer's model is its own (it may keep any of it): never written over.
    optimizer = FedAvgM(eta=1.0, beta=0.9)
    state = _fedavg_round(optimizer, _updates(1))
    kept = {name: tensor.clone() for name, tensor in state.items()}
    optimizer.release(state)
    _fedavg_round(optimizer, _updates(2))
    assert all(torch.equal(state[name], kept[name]) for name in kept)
    # Nor is a model the engine got elsewhere (secure aggregation's decoded mean).
    fedavg = FedAvg()
    _fedavg_round(fedavg, _updates(1))
    foreign = {name: tensor.clone() for name, tensor in _updates(3)[0].items()}
    kept = {name: tensor.clone() for name, tensor in foreign.items()}
    fedavg.release(foreign)
    _fedavg_round(fedavg, _updates(2))
    assert all(torch.equal(foreign[name], kept[name]) for name in kept)


def test_a_robust_rule_is_a_strategy_that_sees_every_update(tmp_path: Path) -> None:
    config = ServerConfig(insecure=True, aggregation="median", min_results=3, min_fit_clients=3)
    strategy = config.build_strategy()
    assert isinstance(strategy, RuleStrategy) and not strategy.streaming
    global_state = {"w": torch.zeros(1)}
    save_state_file(global_state, tmp_path / "global.safetensors")
    updates = []
    for i, value in enumerate([1.0, 2.0, 1000.0]):
        save_state_file({"w": torch.tensor([value])}, tmp_path / f"u{i}.safetensors")
        updates.append((1.0, tmp_path / f"u{i}.safetensors"))
    result = aggregate_files(
        strategy, tmp_path / "global.safetensors", updates, manifest_of(global_state)
    )
    assert result["w"].tolist() == [2.0]


class _Explodes(FedAdam):
    def update(self, name: str, delta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        super().update(name, delta, x)
        return x + 3e38 * delta  # finite in float32, above SUM_LIMIT


def test_a_step_that_leaves_the_bounded_range_is_discarded_and_the_state_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = _Explodes()
    save_state_file({"w": torch.zeros(2)}, tmp_path / "global.safetensors")
    fine = next_global(strategy, tmp_path / "global.safetensors", {"w": torch.zeros(2)}, 1)
    assert fine is not None
    before = {k: v.clone() for k, v in strategy.state_dict().items()}
    assert next_global(strategy, tmp_path / "global.safetensors", {"w": torch.ones(2)}, 2) is None
    assert "round 2: the new global model has values above" in caplog.text
    after = strategy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_non_finite_aggregate_is_never_published(tmp_path: Path) -> None:
    save_state_file({"w": torch.zeros(2)}, tmp_path / "global.safetensors")
    aggregate = {"w": torch.tensor([math.nan, 0.0])}
    assert next_global(FedAvgM(), tmp_path / "global.safetensors", aggregate, 1) is None
    assert next_global(FedAvg(), tmp_path / "global.safetensors", aggregate, 1) is None


def test_evaluation_metrics_are_left_to_the_task_unless_a_strategy_combines_them() -> None:
    assert FedAvg().aggregate_evaluate([(1, {"loss": 1.0}), (3, {"loss": 2.0})]) is None


# ---- strategies from settings -------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path: Path) -> Iterator[str]:
    """A module of user strategies importable as `user_strategies`."""
    (tmp_path / "user_strategies.py").write_text(
        "from fedlink.server.strategy import FedAvg, Strategy\n"
        "from fedlink.server.optimizers import FedAvgM\n"
        "class Incomplete(Strategy):\n"
        "    def begin(self, global_state, manifest): pass\n"
        "class NotAStrategy:\n"
        "    def begin(self, global_state, manifest): pass\n"
        "    def step(self, global_state, aggregate): return aggregate\n"
        "class Scaled(FedAvg):\n"
        "    secure_aggregation = False\n"
        "    def __init__(self, factor: float = 1.0):\n"
        "        super().__init__()\n"
        "        if factor <= 0: raise ValueError('factor must be positive')\n"
        "        self.factor = factor\n"
        "class SlowMomentum(FedAvgM):\n"
        "    pass\n"
    )
    sys.path.insert(0, str(tmp_path))
    yield "user_strategies"
    sys.path.remove(str(tmp_path))
    sys.modules.pop("user_strategies", None)


def _config(**settings: Any) -> ServerConfig:
    return ServerConfig(insecure=True, **settings)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'; use one of fedavg, fedavgm"),
        ({"strategy": "no_such_module:X"}, "cannot import 'no_such_module'"),
        ({"strategy": "user_strategies:Missing"}, "has no class 'Missing'"),
        (
            {"strategy": "user_strategies:NotAStrategy"},
            "must subclass fedlink.server.strategy.Strategy; it lacks accumulate, finish, "
            "state_dict, load_state_dict",
        ),
        ({"strategy": "user_strategies:Incomplete"}, "does not implement accumulate, finish"),
        (
            {"strategy": "user_strategies:Scaled", "strategy_params": {"factr": 2}},
            "unknown parameter(s) factr; it takes factor",
        ),
        (
            {"strategy": "user_strategies:Scaled", "strategy_params": {"factor": -1}},
            "bad parameters: factor must be positive",
        ),
        ({"strategy": "fedadam", "strategy_params": {"eta": -0.1}}, "eta (server learning rate)"),
        ({"strategy": "fedadam", "strategy_params": {"beta2": 1.0}}, "fedadam beta2 must be in"),
        ({"strategy": "fedavg", "strategy_params": {"eta": 1}}, "it takes no parameters"),
        ({"strategy": "fedadagrad", "strategy_params": {"beta2": 0.9}}, "unknown parameter(s)"),
        (
            {"strategy": "fedavgm", "strategy_params": {"inner": "median"}},
            "'inner' is set from aggregation and dp_*",
        ),
        (
            {"strategy": "user_strategies:Scaled", "dp_clip_norm": 1.0},
            "does its own aggregation, so it cannot run with differential privacy",
        ),
        (
            {
                "strategy": "user_strategies:Scaled",
                "secure_aggregation": True,
                "min_fit_clients": 3,
            },
            "secure aggregation reveals only the weighted mean",
        ),
    ],
)
def test_a_strategy_that_breaks_the_contract_is_refused_at_start_up(
    user_module: str, settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        _config(**settings)
    assert message in str(error.value)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_compose_with_dp_secure_aggregation_and_robust_rules(name: str) -> None:
    over_secure = _config(strategy=name, secure_aggregation=True, min_fit_clients=3)
    assert over_secure.build_strategy().secure_aggregation
    over_dp = _config(strategy=name, dp_clip_norm=1.0).build_strategy()
    assert isinstance(over_dp, ServerOptimizer) and "dp fedavg" in repr(over_dp)
    over_krum = _config(strategy=name, aggregation="krum,f=1", min_results=5, min_fit_clients=5)
    assert "krum" in repr(over_krum.build_strategy())


def test_fedprox_sends_mu_with_every_task_and_composes_with_dp_secure_aggregation_and_rules() -> (
    None
):
    config = _config(strategy="fedprox", strategy_params={"mu": 0.1}, task_config={"mode": "x"})
    strategy = config.build_strategy()
    assert repr(strategy) == "fedprox(mu=0.1) over fedavg"
    assert dict(config.task_settings(strategy)) == {"mode": "x", "fedlink.proximal_mu": 0.1}
    over_secure = _config(strategy="fedprox", secure_aggregation=True, min_fit_clients=3)
    assert over_secure.build_strategy().secure_aggregation
    assert "dp fedavg" in repr(_config(strategy="fedprox", dp_clip_norm=1.0).build_strategy())
    over_median = _config(
        strategy="fedprox", aggregation="median", min_results=3, min_fit_clients=3
    )
    assert repr(over_median.build_strategy()).endswith("over median")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"strategy_params": {"mu": -0.1}}, "fedprox mu (proximal term) must be in [0, 10000]"),
        ({"strategy_params": {"mu": math.nan}}, "fedprox mu (proximal term) must be in"),
        (
            {"task_config": {"fedlink.proximal_mu": 1.0}},
            "task_config names starting with 'fedlink.' are fedlink's own",
        ),
    ],
)
def test_bad_fedprox_settings_are_refused_at_start_up(
    settings: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as error:
        _config(strategy="fedprox", **settings)
    assert message in str(error.value)


def test_a_user_server_optimizer_gets_fedlinks_aggregation(user_module: str) -> None:
    strategy = _config(
        strategy="user_strategies:SlowMomentum",
        strategy_params={"beta": 0.5},
        aggregation="median",
        min_results=3,
        min_fit_clients=3,
    ).build_strategy()
    assert isinstance(strategy, FedAvgM) and repr(strategy).endswith("over median")


def test_strategy_params_come_from_a_toml_table_or_a_key_value_flag(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(
        'insecure = true\nstrategy = "fedyogi"\n\n[strategy_params]\neta = 0.01\nbeta1 = 0\n'
    )
    config = load_config(ServerConfig, path=path, environ={})
    strategy = config.build_strategy()
    assert isinstance(strategy, FedYogi) and (strategy.eta, strategy.beta1) == (0.01, 0.0)
    config = load_config(
        ServerConfig,
        path=path,
        environ={"FEDLINK_STRATEGY_PARAMS": "eta=0.5, tau=1e-2"},
    )
    assert config.strategy_params == {"eta": 0.5, "tau": 0.01}
    with pytest.raises(ConfigError, match="expected name = value pairs"):
        load_config(ServerConfig, path=path, environ={"FEDLINK_STRATEGY_PARAMS": "eta"})


def test_a_stateless_strategy_refuses_state_from_another_strategy() -> None:
    state: Mapping[str, torch.Tensor] = {"m/w": torch.zeros(1)}
    with pytest.raises(ValueError, match="fedavg keeps no state"):
        FedAvg().load_state_dict(state)
    assert isinstance(FedAvg(), Strategy)


# ---- the custom strategy of docs/strategies.md ---------------------------------------------------


def _docs_example(tmp_path: Path) -> type[Strategy]:
    doc = Path(__file__).resolve().parents[2] / "docs" / "strategies.md"
    (code,) = re.findall(
        r'^```python\n("""capped\.py.*?)^```$', doc.read_text(), re.MULTILINE | re.DOTALL
    )
    path = tmp_path / "capped.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location("capped", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cls: type[Strategy] = module.CappedFedAvg
    return cls


def test_the_docs_example_caps_each_sites_weight_and_decays_its_rate(tmp_path: Path) -> None:
    strategy = _docs_example(tmp_path)(cap=10, eta=1.0)
    x0 = {"w": torch.tensor([0.0, 1.0]), "n": torch.tensor(7)}
    save_state_file(x0, tmp_path / "global.safetensors")
    updates = []
    for i, (values, count) in enumerate([([3.0, 1.0], 30), ([0.0, 4.0], 5)]):
        save_state_file({"w": torch.tensor(values), "n": torch.tensor(9)}, tmp_path / f"{i}.st")
        updates.append((float(count), tmp_path / f"{i}.st"))
    manifest = manifest_of(x0)
    # Weights min(30, 10) = 10 and 5: mean change (10 * [3, 0] + 5 * [0, 3]) / 15 = [2, 1].
    aggregate = aggregate_files(strategy, tmp_path / "global.safetensors", updates, manifest)
    assert aggregate["w"].tolist() == [2.0, 2.0] and int(aggregate["n"]) == 7
    x1 = next_global(strategy, tmp_path / "global.safetensors", aggregate, 1)
    assert x1 is not None and x1["w"].tolist() == [2.0, 2.0]  # rate 1 / sqrt(1)
    save_state_file(x1, tmp_path / "global.safetensors")
    moved = {"w": torch.tensor([4.0, 2.0]), "n": torch.tensor(7)}
    resumed = _docs_example(tmp_path)(cap=10, eta=1.0)
    resumed.load_state_dict(strategy.state_dict())
    x2 = next_global(resumed, tmp_path / "global.safetensors", moved, 2)
    assert x2 is not None
    assert x2["w"].tolist() == pytest.approx([2.0 + 2.0 / sqrt(2), 2.0])  # rate 1 / sqrt(2)


def test_the_docs_example_is_refused_where_it_cannot_run(tmp_path: Path) -> None:
    _docs_example(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ConfigError, match="cap and eta must be positive"):
            _config(strategy="capped:CappedFedAvg", strategy_params={"cap": 0})
        with pytest.raises(ConfigError, match="secure aggregation reveals only"):
            _config(strategy="capped:CappedFedAvg", secure_aggregation=True, min_fit_clients=3)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("capped", None)


def test_a_run_cannot_be_resumed_with_another_strategy(tmp_path: Path) -> None:
    config = _config(strategy="fedavg")
    model = tmp_path / "global-000001.safetensors"
    save_state_file({"w": torch.zeros(1)}, model)
    checkpoint = Checkpoint(
        round=1,
        model=PayloadFile.seal(model),
        clients=(),
        record={},
        run={"task": "digits", "seed": 0, "strategy": "fedadam"},
    )
    with pytest.raises(ConfigError, match="a run with strategy='fedadam'"):
        check_resumable(checkpoint, run_identity(config))
    # A checkpoint from before strategies existed was a FedAvg run.
    older = dataclasses.replace(checkpoint, run={"task": "digits", "seed": 0})
    check_resumable(older, run_identity(config))
    with pytest.raises(ConfigError, match="a run with strategy='fedavg'"):
        check_resumable(older, run_identity(_config(strategy="fedyogi")))
