"""Tests for the robust aggregation rules: known answers, Byzantine inputs, parameter checks."""

from __future__ import annotations

import pytest
import torch

from fedlink.common.errors import ConfigError
from fedlink.common.tensors import StateDict, manifest_of
from fedlink.server import robust
from fedlink.server.aggregation import StreamingFedAvg
from fedlink.server.robust import (
    AggregationRule,
    FedAvg,
    Median,
    MultiKrum,
    NormClipping,
    TrimmedMean,
    Update,
    parse_rule,
)


def _model(value: float | list[float], counter: int = 0) -> StateDict:
    """A two-tensor model: `w` holds the given values, `steps` is an integer counter."""
    values = value if isinstance(value, list) else [value]
    return {"w": torch.tensor(values, dtype=torch.float32), "steps": torch.tensor(counter)}


def _run(rule: AggregationRule, global_state: StateDict, locals_: list[StateDict]) -> StateDict:
    updates: list[Update] = [(1.0, state) for state in locals_]
    return rule.aggregate(global_state, updates, manifest_of(global_state))


def _random_models(count: int, seed: int, shape: tuple[int, ...] = (6, 5)) -> list[StateDict]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "layer.weight": torch.randn(shape, generator=generator),
            "layer.bias": torch.randn(shape[0], generator=generator, dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(i, dtype=torch.int64),
        }
        for i in range(count)
    ]


def test_median_takes_the_middle_value_for_odd_and_the_mid_mean_for_even_n() -> None:
    glob = _model(10.0)
    assert _run(Median(), glob, [_model(v) for v in (11.0, 12.0, 1e9)])["w"].item() == 12.0
    even = _run(Median(), glob, [_model(v) for v in (11.0, 12.0, 13.0, -1e9)])
    assert even["w"].item() == pytest.approx(11.5)


def test_trimmed_mean_drops_beta_n_values_at_each_end() -> None:
    locals_ = [_model(v) for v in (-1000.0, 1.0, 2.0, 6.0, 1000.0)]
    result = _run(TrimmedMean(beta=0.2), _model(0.0), locals_)
    assert result["w"].item() == pytest.approx(3.0)  # mean of 1, 2, 6


def test_krum_picks_the_update_closest_to_its_neighbours() -> None:
    # n = 5, f = 1: each score sums the n - f - 2 = 2 smallest squared distances.
    # 0 -> 0.01 + 0.09; 0.1 -> 0.01 + 0.04; 0.3 -> 0.04 + 0.09; 5 and 100 are far away.
    values = [0.0, 0.1, 0.3, 5.0, 100.0]
    result = _run(MultiKrum(f=1, m=1), _model(0.0), [_model(v) for v in values])
    assert result["w"].item() == pytest.approx(0.1)


def test_multi_krum_averages_the_m_best_scored_updates() -> None:
    locals_ = [_model(v) for v in (0.0, 0.1, 0.3, 5.0, 100.0)]
    assert _run(MultiKrum(f=1, m=3), _model(0.0), locals_)["w"].item() == pytest.approx(0.4 / 3)
    # m unset is n - f = 4: only the outlier at 100 is left out.
    assert _run(MultiKrum(f=1), _model(0.0), locals_)["w"].item() == pytest.approx(5.4 / 4)


def test_krum_breaks_score_ties_towards_the_earlier_update() -> None:
    locals_ = [_model(v) for v in (1.0, 2.0, 3.0, 4.0, 5.0)]
    # Scores: 1 -> 1 + 4, 2 -> 1 + 1, 3 -> 1 + 1, 4 -> 1 + 1, 5 -> 1 + 4: three-way tie.
    assert _run(MultiKrum(f=1, m=1), _model(0.0), locals_)["w"].item() == 2.0


@pytest.mark.parametrize(
    "rule",
    [Median(), TrimmedMean(beta=0.1), MultiKrum(f=1, m=1), MultiKrum(f=1)],
    ids=lambda rule: f"{rule.name}",
)
def test_one_update_scaled_by_a_million_does_not_move_the_robust_rules(
    rule: AggregationRule,
) -> None:
    glob = _random_models(1, seed=0)[0]
    honest = [
        {name: t + 0.01 * (i + 1) if t.is_floating_point() else t for name, t in glob.items()}
        for i in range(9)
    ]
    attacker = {
        name: glob[name] + 1e6 * (honest[0][name] - glob[name]) if t.is_floating_point() else t
        for name, t in glob.items()
    }
    poisoned = _run(rule, glob, [*honest, attacker])
    for name in ("layer.weight", "layer.bias"):
        stacked = torch.stack([state[name] for state in honest])
        low, high = stacked.min(dim=0).values, stacked.max(dim=0).values
        assert bool(((poisoned[name] >= low - 1e-6) & (poisoned[name] <= high + 1e-6)).all()), name
    # Plain FedAvg is dragged a long way by the same update.
    averaged = _run(FedAvg(), glob, [*honest, attacker])
    assert (averaged["layer.weight"] - glob["layer.weight"]).abs().min() > 100


def test_krum_result_is_one_of_the_honest_updates_under_attack() -> None:
    honest = _random_models(7, seed=1)
    glob = _random_models(1, seed=2)[0]
    attackers = [
        {name: t * 1e6 if t.is_floating_point() else t for name, t in honest[0].items()}
        for _ in range(2)
    ]
    result = _run(MultiKrum(f=2, m=1), glob, [*honest, *attackers])
    matches = [
        all(torch.allclose(result[n], h[n], atol=1e-5) for n in ("layer.weight", "layer.bias"))
        for h in honest
    ]
    assert sum(matches) == 1


def test_integer_buffers_take_the_median_with_the_global_value_in_every_rule() -> None:
    # Votes 0 (global), 3, 9, 4, 1, 2**62 (one client forging its counter): upper median 4.
    counters = (3, 9, 4, 1, 2**62)
    locals_ = [_model(float(i), counter=c) for i, c in enumerate(counters)]
    for rule in (FedAvg(), Median(), TrimmedMean(0.2), MultiKrum(f=1, m=1), NormClipping(Median())):
        result = _run(rule, _model(0.0), locals_)
        assert result["steps"].item() == 4, rule.name
        assert result["steps"].dtype == torch.int64


def test_fedavg_rule_matches_streaming_fedavg_exactly() -> None:
    locals_ = _random_models(4, seed=3)
    weights = [10.0, 30.0, 5.0, 55.0]
    manifest = manifest_of(locals_[0])
    streaming = StreamingFedAvg(manifest, locals_[0])
    for state, weight in zip(locals_, weights, strict=True):
        streaming.add(state, weight)
    expected = streaming.result()
    result = FedAvg().aggregate(locals_[0], list(zip(weights, locals_, strict=True)), manifest)
    for name in expected:
        assert torch.equal(result[name], expected[name]), name


def test_clipping_scales_only_deltas_longer_than_the_bound() -> None:
    glob = _model([1.0, 1.0])
    short = _model([1.0, 4.0])  # delta (0, 3), norm 3: kept
    long = _model([41.0, 1.0])  # delta (40, 0), norm 40: scaled to (5, 0)
    result = _run(NormClipping(FedAvg(), max_norm=5.0), glob, [short, long])
    assert torch.allclose(result["w"], torch.tensor([1.0 + 2.5, 1.0 + 1.5]))


def test_clipping_without_a_bound_uses_the_median_norm_of_the_round() -> None:
    glob = _model([0.0])
    locals_ = [_model([1.0]), _model([-2.0]), _model([300.0])]  # norms 1, 2, 300 -> bound 2
    result = _run(NormClipping(FedAvg()), glob, locals_)
    assert result["w"].item() == pytest.approx((1.0 - 2.0 + 2.0) / 3)


def test_clipping_composes_with_krum_distances() -> None:
    # Clipped to norm 1, the two far updates both land on 1.0 and become Krum's closest pair.
    locals_ = [_model(v) for v in (0.0, 0.2, 0.9, 50.0, 100.0)]
    clipped = _run(NormClipping(MultiKrum(f=1, m=1), max_norm=1.0), _model(0.0), locals_)
    assert clipped["w"].item() == pytest.approx(1.0)
    assert _run(MultiKrum(f=1, m=1), _model(0.0), locals_)["w"].item() == pytest.approx(0.2)


@pytest.mark.parametrize(
    "rule",
    [FedAvg(), Median(), TrimmedMean(0.2), MultiKrum(f=1), NormClipping(Median(), 0.5)],
    ids=lambda rule: rule.name,
)
def test_slicing_large_tensors_gives_the_same_result(
    rule: AggregationRule, monkeypatch: pytest.MonkeyPatch
) -> None:
    glob, *locals_ = _random_models(6, seed=4, shape=(37, 11))
    whole = _run(rule, glob, locals_)
    monkeypatch.setattr(robust, "CHUNK_BUDGET", 5 * 13)  # 13 elements per update per slice
    sliced = _run(rule, glob, locals_)
    for name in whole:
        assert torch.allclose(whole[name], sliced[name], atol=1e-6), name


def test_results_keep_the_manifest_dtypes_and_leave_the_inputs_untouched() -> None:
    glob, *locals_ = _random_models(6, seed=5)
    glob["half"] = torch.ones(3, dtype=torch.float16)
    for i, state in enumerate(locals_):
        state["half"] = torch.full((3,), float(i), dtype=torch.float16)
    before = {name: t.clone() for name, t in glob.items()}
    for rule in (Median(), TrimmedMean(0.2), MultiKrum(f=1), NormClipping(FedAvg(), 0.1)):
        result = _run(rule, glob, locals_)
        assert {n: t.dtype for n, t in result.items()} == {n: t.dtype for n, t in glob.items()}
        for name, tensor in before.items():
            assert torch.equal(glob[name], tensor), (rule.name, name)


def test_same_updates_in_the_same_order_give_bit_identical_results() -> None:
    glob, *locals_ = _random_models(8, seed=6)
    for rule in (Median(), TrimmedMean(0.25), MultiKrum(f=2), NormClipping(FedAvg())):
        first, second = _run(rule, glob, locals_), _run(rule, glob, locals_)
        assert all(torch.equal(first[n], second[n]) for n in first), rule.name


def test_rules_refuse_too_few_updates_with_the_number_they_need() -> None:
    locals_ = [_model(float(v)) for v in range(4)]
    with pytest.raises(ConfigError, match="krum needs at least 5 updates, got 4"):
        _run(MultiKrum(f=1, m=1), _model(0.0), locals_)
    with pytest.raises(ConfigError, match="multi-krum needs at least 7 updates"):
        _run(MultiKrum(f=2), _model(0.0), locals_)
    with pytest.raises(ConfigError, match="trimmed-mean needs at least 5 updates"):
        _run(TrimmedMean(0.2), _model(0.0), locals_)
    with pytest.raises(ConfigError, match="needs at least 1 updates, got 0"):
        _run(Median(), _model(0.0), [])
    assert MultiKrum(f=3, m=6).min_updates == 9
    assert MultiKrum(f=1, m=6).min_updates == 7
    assert TrimmedMean(0.1).min_updates == 10
    assert NormClipping(MultiKrum(f=2)).min_updates == 7


def test_rules_refuse_bad_parameters_and_weights() -> None:
    for beta in (0.0, 0.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="beta must be in"):
            TrimmedMean(beta)
    with pytest.raises(ConfigError, match=r"f .* must be >= 0"):
        MultiKrum(f=-1)
    with pytest.raises(ConfigError, match=r"m .* must be >= 1"):
        MultiKrum(f=1, m=0)
    with pytest.raises(ConfigError, match="positive and finite"):
        NormClipping(FedAvg(), max_norm=0.0)
    with pytest.raises(ValueError, match="weight must be positive"):
        Median().aggregate(_model(0.0), [(0.0, _model(1.0))], manifest_of(_model(0.0)))


def test_parse_rule_builds_each_rule_from_its_spec() -> None:
    assert isinstance(parse_rule("fedavg"), FedAvg)
    assert isinstance(parse_rule(" median "), Median)
    trimmed = parse_rule("trimmed-mean,beta=0.2")
    assert isinstance(trimmed, TrimmedMean) and trimmed.beta == 0.2
    krum = parse_rule("krum,f=2")
    assert isinstance(krum, MultiKrum) and (krum.f, krum.m, krum.name) == (2, 1, "krum")
    multi = parse_rule("multi-krum, f=3, m=5")
    assert isinstance(multi, MultiKrum) and (multi.f, multi.m) == (3, 5)
    assert isinstance(parse_rule("multi-krum,f=3"), MultiKrum)
    clipped = parse_rule("median,clip=median")
    assert isinstance(clipped, NormClipping) and clipped.max_norm is None
    assert isinstance(clipped.inner, Median)
    fixed = parse_rule("fedavg,clip=2.5")
    assert isinstance(fixed, NormClipping) and fixed.max_norm == 2.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mean", "unknown aggregation 'mean'"),
        ("krum", "krum takes \\['f'\\]"),
        ("median,beta=0.1", "median takes \\[\\]"),
        ("krum,f=two", "invalid literal"),
        ("krum,f=1,f=2", "not a new key=value"),
        ("trimmed-mean,beta", "not a new key=value"),
        ("trimmed-mean,beta=0.7", "beta must be in"),
        ("fedavg,clip=-1", "positive and finite"),
    ],
)
def test_parse_rule_refuses_malformed_specs_with_the_grammar(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_rule(spec)
