"""The coordinator's strategy from its settings: a built-in name or a user class by dotted path,
its parameters, and the aggregation rule and DP it composes with; refused at start-up, with a
message that says what to change, when the combination cannot work."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

from fedlink.common.errors import ConfigError
from fedlink.server.optimizers import FedAdagrad, FedAdam, FedAvgM, FedYogi
from fedlink.server.privacy import DPFedAvg
from fedlink.server.robust import FedAvg as FedAvgRule
from fedlink.server.robust import parse_rule
from fedlink.server.scaffold import Scaffold
from fedlink.server.strategy import (
    Composition,
    FedAvg,
    FedProx,
    RuleStrategy,
    Strategy,
    WrappingStrategy,
)

BUILT_IN: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedProx, Scaffold)
}
_API = ("begin", "accumulate", "finish", "step", "state_dict", "load_state_dict")
_HELP = (
    f"use one of {', '.join(BUILT_IN)} or a subclass of fedlink.server.strategy.Strategy as "
    '"package.module:ClassName" (see docs/strategies.md)'
)


def build_strategy(
    spec: str,
    params: Mapping[str, Any] | None,
    *,
    aggregation: str = "fedavg",
    dp: tuple[float, float] | None = None,
    secure_aggregation: bool = False,
    composition: Composition | None = None,
) -> Strategy:
    """The strategy named by `spec` with `params`, over the aggregation rule `aggregation`
    (wrapped in DP-FedAvg with (noise multiplier, clip norm) `dp`); `composition` adds the rest
    of the federation's settings the strategy may refuse (`Strategy.check_composition`)."""
    cls = _strategy_class(spec)
    params = dict(params or {})
    composition = composition or Composition()
    composition = dataclasses.replace(
        composition,
        aggregation=aggregation,
        dp=dp is not None,
        secure_aggregation=secure_aggregation,
    )
    rule = parse_rule(aggregation)
    if dp is not None and not secure_aggregation:
        # Under secure aggregation the clients clip and noise their own changes (common/dp.py),
        # and the decoded sum is already DP-FedAvg's noised mean.
        rule = DPFedAvg(rule, *dp)
    inner: Strategy = FedAvg() if type(rule) is FedAvgRule else RuleStrategy(rule)
    if cls is FedAvg:
        _bind(spec, cls, params)
        strategy = inner
    elif issubclass(cls, WrappingStrategy):
        strategy = _construct(spec, cls, {**_bind(spec, cls, params), "inner": inner})
    else:
        strategy = _construct(spec, cls, _bind(spec, cls, params))
    try:
        strategy.check_composition(composition)
    except ValueError as exc:
        raise ConfigError(f"strategy {spec!r}: {exc}") from None
    own_aggregation = not isinstance(strategy, WrappingStrategy) and cls is not FedAvg
    if own_aggregation and not isinstance(inner, FedAvg):
        raise ConfigError(
            f"strategy {spec!r} does its own aggregation, so it cannot run with "
            f"{'differential privacy' if dp else f'aggregation = {aggregation!r}'}; "
            "subclass fedlink.server.strategy.WrappingStrategy (or "
            "fedlink.server.optimizers.ServerOptimizer) to work on fedlink's aggregate instead"
        )
    if secure_aggregation and not strategy.secure_aggregation:
        raise ConfigError(
            f"secure aggregation reveals only the weighted mean of the updates, and strategy "
            f"{spec!r} (aggregation {aggregation!r}) needs more than that; use fedavg or a "
            "server optimizer over it, or turn secure_aggregation off"
        )
    return strategy


def _strategy_class(spec: str) -> type[Strategy]:
    if spec in BUILT_IN:
        return BUILT_IN[spec]
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name.isidentifier():
        raise ConfigError(f"unknown strategy {spec!r}; {_HELP}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"strategy {spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from None
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"strategy {spec!r}: {module_name} has no class {class_name!r}")
    if not issubclass(cls, Strategy):
        missing = [name for name in _API if not callable(getattr(cls, name, None))]
        lacks = f"; it lacks {', '.join(missing)}" if missing else ""
        raise ConfigError(
            f"strategy {spec!r} must subclass fedlink.server.strategy.Strategy{lacks}"
        )
    if inspect.isabstract(cls):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        raise ConfigError(f"strategy {spec!r} does not implement {', '.join(missing)}")
    return cls


def _bind(spec: str, cls: type[Strategy], params: dict[str, Any]) -> dict[str, Any]:
    """`params` checked against the constructor's signature (`inner` is fedlink's to set)."""
    signature = inspect.signature(cls)
    accepted = [name for name in signature.parameters if name != "inner"]
    if "inner" in params:
        raise ConfigError(
            f"strategy {spec!r}: 'inner' is set from aggregation and dp_*, not as a parameter"
        )
    takes = f"it takes {', '.join(accepted) or 'no parameters'}"
    if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        unknown = sorted(set(params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"strategy {spec!r}: unknown parameter(s) {', '.join(unknown)}; {takes}"
            )
    try:
        signature.bind_partial(**params)
    except TypeError as exc:
        raise ConfigError(f"strategy {spec!r}: bad parameters ({exc}); {takes}") from None
    return params


def _construct(spec: str, cls: type[Strategy], params: dict[str, Any]) -> Strategy:
    try:
        strategy = cls(**params)
    except ConfigError as exc:
        raise ConfigError(f"strategy {spec!r}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"strategy {spec!r}: bad parameters: {exc}") from None
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy {spec!r} did not construct a Strategy")
    return strategy
