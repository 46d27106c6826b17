"""The Strategy API: how a round's results become the next global model (docs/strategies.md).

A strategy sees each round in three steps, which the round engine calls in this order:

1. aggregation, streaming: `begin(global_state, manifest)`, then `accumulate(update, weight)` once
   per accepted update (in order of client identity, so a seeded run is reproducible), then
   `finish()` returns the aggregate. A streaming strategy folds each update into O(model) state
   and must not keep a reference to `update` (it is a memory-mapped file closed right after).
   A strategy that needs every update at once (a median, Krum) sets `streaming = False`: the
   engine then keeps every update mapped until `finish()`.
2. the server step: `step(global_state, aggregate)` returns the new global model (FedAvg: the
   aggregate itself; server optimizers such as FedAdam: global + a step along aggregate - global).
   Its state (momentum, second moments) is `state_dict()` and goes into every checkpoint.
3. evaluation: `aggregate_evaluate(results)` combines the clients' evaluation metrics.

Under secure aggregation the coordinator learns only the weighted mean of the updates, so steps
1's three calls are skipped and `step` receives that mean: only a strategy whose aggregate *is*
the weighted mean (`secure_aggregation = True`) may run there.

Clients hear from the strategy through `client_settings()`: plain values that travel with every
task next to the federation's `[task_config]` (FedProx's proximal term mu), which the clients'
training reads. A strategy may also exchange named extra tensors both ways (SCAFFOLD's control
variates): `download_tensors` go into every training task's payload beside the global model,
and every training result must carry the tensors `upload_manifest` declares, which `accumulate`
receives in the same `update` mapping.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlink.common.task_settings import MAX_PROXIMAL_MU, PROXIMAL_MU, SettingValue
from fedlink.common.tensors import Manifest, StateDict, open_state_file
from fedlink.server.aggregation import SUM_LIMIT, StreamingFedAvg
from fedlink.server.robust import AggregationRule
from fedlink.server.validation import largest_magnitude

log = logging.getLogger(__name__)

# (number of examples, metrics) reported by each client that evaluated the global model.
EvaluationResults = Sequence[tuple[int, Mapping[str, float]]]


@dataclass(frozen=True)
class Composition:
    """The federation's settings a strategy may refuse to run with (`check_composition`)."""

    aggregation: str = "fedavg"
    dp: bool = False  # client-level DP-FedAvg (dp_clip_norm)
    secure_aggregation: bool = False
    dpsgd: bool = False  # record-level DP-SGD on the clients (dpsgd_noise_multiplier)
    update_codec: str = ""  # the update codec's description; empty: plain fp32 updates
    optimizer: str = "sgd"  # the clients' local optimizer
    momentum: float = 0.0


class Strategy(ABC):
    """Turns a round's accepted updates into the next global model.

    Subclass it, implement `begin`, `accumulate` and `finish`, and override `step`,
    `state_dict`/`load_state_dict` and `aggregate_evaluate` where the algorithm differs.
    Class attributes declare how the strategy composes with the rest of fedlink.
    """

    name: str = "custom"
    # False: the engine keeps every update of the round mapped until `finish` (O(clients) files).
    streaming: bool = True
    # True: the aggregate is the weighted mean of the updates, so secure aggregation's decoded
    # mean can stand in for begin/accumulate/finish.
    secure_aggregation: bool = False
    # True: `download_tensors` and `upload_manifest` are not empty (SCAFFOLD): its virtual
    # clients keep state on the simulation's disk, so `fedlink simulate` refuses the Ray backend.
    extra_tensors: bool = False

    def __repr__(self) -> str:
        return self.name

    @abstractmethod
    def begin(self, global_state: Mapping[str, torch.Tensor], manifest: Manifest) -> None:
        """Start a round's aggregation from the model the clients trained on."""

    @abstractmethod
    def accumulate(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in one validated update (a full local model matching the manifest) with its
        weight (the client's reported example count, positive and capped)."""

    @abstractmethod
    def finish(self) -> StateDict:
        """The round's aggregate, a full model in the manifest's dtypes."""

    def step(self, global_state: Mapping[str, torch.Tensor], aggregate: StateDict) -> StateDict:
        """The new global model from the aggregate (default: the aggregate itself)."""
        return aggregate

    def release(self, state: StateDict) -> None:
        """The engine is done with the model `step` returned (written and evaluated) and
        keeps no reference to it: a strategy may reuse the memory of tensors it
        made itself for its next round (FedAvg does). Default: nothing."""
        return None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State that must survive a restart (saved with each checkpoint); tensors only."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore `state_dict()` from a checkpoint."""
        if state:
            raise ValueError(f"{self.name} keeps no state, got {sorted(state)[:5]}")

    def client_settings(self) -> dict[str, SettingValue]:
        """Settings every client receives with each task, beside the federation's
        `[task_config]` (whose names they must not reuse): plain strings, integers, finite
        numbers or booleans, checked at start-up. Names starting with "fedlink." are fedlink's
        own (FedProx's "fedlink.proximal_mu"); a task reads the others in `config.task_config`.
        Default: none."""
        return {}

    def check_composition(self, composition: Composition) -> None:
        """Raise ValueError, saying what to change, when the strategy cannot run with these
        settings (checked at start-up, before fedlink's own rules). Default: accepts them."""
        return None

    def download_tensors(self, manifest: Manifest) -> StateDict:
        """Extra tensors every training task carries beside the global model (whose tensors
        `manifest` describes), named "fedlink.<strategy>.<group>/<tensor>" (SCAFFOLD's c). The
        engine writes them into each round's task payload; they never go into the published
        model or its checkpoint (keep what must survive a restart in `state_dict`).
        Default: none."""
        return {}

    def upload_manifest(self, manifest: Manifest) -> Manifest:
        """Extra tensors every training result must carry beside the model (names as for
        `download_tensors`, dtypes, shapes). They are checked like the model's own (exact
        names, dtypes and shapes, finite, within the bound on the aggregate's sums), a result
        without them is refused, and `accumulate` receives them in the same `update` mapping.
        Default: none."""
        return {}

    def set_population(self, clients: int) -> None:
        """Called before each round's aggregation with the number of clients known to the
        federation (N: every client that joined this run, or the run it resumed). Default:
        ignored."""
        return None

    def aggregate_evaluate(self, results: EvaluationResults) -> dict[str, float] | None:
        """The round's federated metrics from the clients' `(num_examples, metrics)`; None (the
        default) leaves it to the task's aggregation (server/metrics.py: means weighted by
        example count, and the task's own for the metrics it declares)."""
        return None


class FedAvg(Strategy):
    """FedAvg (McMahan et al. 2017): new = sum(n_i * w_i) / sum(n_i), folded in as updates
    arrive (`StreamingFedAvg`: one float32 accumulator, integer buffers by median).

    Composes with secure aggregation (it is what secure aggregation computes), DP (DP-FedAvg is
    the robust-rule path's "dp fedavg" rule) and nothing else: robust rules are `RuleStrategy`.
    """

    name = "fedavg"
    secure_aggregation = True

    def __init__(self) -> None:
        self._average: StreamingFedAvg | None = None
        self._made: StateDict = {}  # what the last `finish` returned
        self._spare: StateDict = {}  # of it, what the engine released: the next round's sums

    def begin(self, global_state: Mapping[str, torch.Tensor], manifest: Manifest) -> None:
        # Fresh memory costs more than the sums on some machines (docs/large-models.md).
        self._average = StreamingFedAvg(manifest, global_state, reuse=self._spare)
        self._made, self._spare = {}, {}

    def accumulate(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        assert self._average is not None, "begin() first"
        self._average.add(update, weight)

    def finish(self) -> StateDict:
        assert self._average is not None, "begin() first"
        average, self._average = self._average, None
        result = average.result()
        self._made = dict(result)
        return result

    def release(self, state: StateDict) -> None:
        # Only the tensors this strategy made: a server step's new tensors are someone else's.
        self._spare = {name: t for name, t in state.items() if self._made.get(name) is t}
        self._made = {}


class WrappingStrategy(Strategy):
    """A strategy over the federation's aggregation (`inner`: FedAvg, or the robust rule or
    DP-FedAvg it is configured with), which runs `begin`/`accumulate`/`finish` unchanged; the
    subclass adds a server step (ServerOptimizer) or client settings (FedProx). So it composes
    with whatever `inner` composes with."""

    def __init__(self, inner: Strategy | None = None) -> None:
        self.inner = FedAvg() if inner is None else inner
        # The inner strategy's aggregation is what runs.
        self.streaming = self.inner.streaming
        self.secure_aggregation = self.inner.secure_aggregation

    def begin(self, global_state: Mapping[str, torch.Tensor], manifest: Manifest) -> None:
        self.inner.begin(global_state, manifest)

    def accumulate(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        self.inner.accumulate(update, weight)

    def finish(self) -> StateDict:
        return self.inner.finish()

    def release(self, state: StateDict) -> None:
        # A step that passes the aggregate through (FedProx) gives back the inner's own tensors;
        # one that computes the model (a server optimizer) may keep any of them.
        if type(self).step is Strategy.step:
            self.inner.release(state)


class FedProx(WrappingStrategy):
    """FedProx (Li et al. 2020): each client minimises its loss plus (mu / 2) ||w - w_t||^2,
    where w_t is the global model it received (common/tasks/training.py adds the term's
    gradient mu (w - w_t) at every local step); the server aggregates as `inner` does.

    All the algorithm does happens on the clients, so it composes with secure aggregation, DP
    and the robust rules exactly as `inner` does. mu = 0 is FedAvg.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01, inner: Strategy | None = None) -> None:
        super().__init__(inner)
        mu = float(mu)
        if not (math.isfinite(mu) and 0 <= mu <= MAX_PROXIMAL_MU):
            raise ValueError(
                f"fedprox mu (proximal term) must be in [0, {MAX_PROXIMAL_MU:g}], got {mu}"
            )
        self.mu = mu

    def __repr__(self) -> str:
        return f"{self.name}(mu={self.mu:g}) over {self.inner!r}"

    def client_settings(self) -> dict[str, SettingValue]:
        return {PROXIMAL_MU: self.mu}


class RuleStrategy(Strategy):
    """A rule that needs every update at once (median, trimmed mean, Krum, norm clipping,
    DP-FedAvg: server/robust.py, server/privacy.py) as a strategy: keeps the mapped updates and
    runs the rule in `finish`. The rule reads them slice by slice, so memory stays O(model)
    even though O(clients) files are open."""

    streaming = False

    def __init__(self, rule: AggregationRule) -> None:
        self.rule = rule
        self.name = rule.name
        self._global: Mapping[str, torch.Tensor] | None = None
        self._manifest: Manifest = {}
        self._updates: list[tuple[float, Mapping[str, torch.Tensor]]] = []

    def begin(self, global_state: Mapping[str, torch.Tensor], manifest: Manifest) -> None:
        self._global, self._manifest, self._updates = global_state, manifest, []

    def accumulate(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        self._updates.append((weight, update))

    def finish(self) -> StateDict:
        assert self._global is not None, "begin() first"
        updates, self._updates = self._updates, []
        return self.rule.aggregate(self._global, updates, self._manifest)


def aggregate_files(
    strategy: Strategy, global_path: Path, updates: Sequence[tuple[float, Path]], manifest: Manifest
) -> StateDict:
    """Run the strategy's aggregation over spooled update files, in the order given.

    A streaming strategy sees one mapped update at a time; otherwise every file stays mapped
    until `finish` (as `streaming = False` declares).
    """
    with ExitStack() as files:
        global_state = files.enter_context(open_state_file(global_path))
        strategy.begin(global_state, manifest)
        for weight, path in updates:
            if strategy.streaming:
                with open_state_file(path) as state:
                    strategy.accumulate(state, weight)
            else:
                strategy.accumulate(files.enter_context(open_state_file(path)), weight)
        return strategy.finish()


def next_global(
    strategy: Strategy, global_path: Path, aggregate: StateDict, round_number: int
) -> StateDict | None:
    """The strategy's step from the current global model, checked like any input: None (and
    the strategy's state left as it was) when the result is non-finite or so large that the
    next round's sums could overflow, so such a model is never published or checkpointed."""
    before = {name: tensor.clone() for name, tensor in strategy.state_dict().items()}
    with open_state_file(global_path) as global_state:
        state = strategy.step(global_state, aggregate)
    largest = {name: largest_magnitude(tensor) for name, tensor in state.items()}
    if broken := [name for name, value in largest.items() if not math.isfinite(value)]:
        problem = f"non-finite values in {', '.join(broken[:5])}"
    elif huge := [name for name, value in largest.items() if value > SUM_LIMIT]:
        problem = f"values above {SUM_LIMIT:.3g} in {', '.join(huge[:5])}"
    elif broken := _out_of_range(strategy.state_dict()):
        problem = f"a strategy state out of range in {', '.join(broken[:5])}"
    else:
        return state
    # Every update was checked, so this takes a rule, a server step or a decoded secure sum
    # gone wrong.
    log.error("round %d: the new global model has %s; it is discarded", round_number, problem)
    strategy.load_state_dict(before)
    return None


def _out_of_range(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The tensors with NaN, Inf or values above SUM_LIMIT (a moment or control variate that
    would make the next round's arithmetic overflow)."""
    return [name for name, tensor in state.items() if not largest_magnitude(tensor) <= SUM_LIMIT]
