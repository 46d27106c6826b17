"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", Algorithm 1 with option II): the server's side.

Each round the clients receive the global model x and the server control variate c, take K
local steps y <- y - lr (g(y) - c_i + c), and return y_i and Delta c_i = c_i+ - c_i, where
c_i+ = c_i - c + (x - y_i) / (K lr) (common/scaffold.py, common/tasks/training.py). The server
then takes, over the round's accepted results S out of N known clients,

    x <- x + eta_g (mean_i y_i - x)
    c <- c + (|S| / N) mean_i Delta c_i

with the means weighted by the clients' example counts, as FedAvg's is (the paper's unweighted
means are the special case of equal counts). c has one tensor per floating tensor the federation
exchanges, in the accumulator dtype (float32; float64 for float64 tensors), and is the
strategy's checkpointed state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedlink.common.scaffold import CONTROL_DELTA, SCAFFOLD, SERVER_CONTROL, split_control
from fedlink.common.task_settings import SettingValue
from fedlink.common.tensors import Manifest, StateDict, TensorSpec, manifest_of
from fedlink.server.aggregation import StreamingFedAvg, accumulator_dtype
from fedlink.server.strategy import Composition, Strategy

_STATE = "c/"


def control_manifest(manifest: Manifest) -> Manifest:
    """The control variates' tensors for a model: one per floating tensor, accumulator dtype."""
    return {
        name: TensorSpec(accumulator_dtype(spec.dtype), spec.shape)
        for name, spec in manifest.items()
        if spec.dtype.is_floating_point
    }


class Scaffold(Strategy):
    """SCAFFOLD, option II; `eta` is the global step size eta_g (1: x becomes the mean)."""

    name = "scaffold"
    extra_tensors = True

    def __init__(self, eta: float = 1.0) -> None:
        eta = float(eta)
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"scaffold eta (global step size eta_g) must be positive, got {eta}")
        self.eta = eta
        self.control: StateDict = {}  # c by model tensor name; zeros until the first round
        self._population = 0
        self._models: StreamingFedAvg | None = None
        self._deltas: StreamingFedAvg | None = None
        self._mean_delta: StateDict = {}
        self._contributors = 0

    def __repr__(self) -> str:
        return f"{self.name}(eta={self.eta:g})"

    def check_composition(self, composition: Composition) -> None:
        refused = []
        if composition.secure_aggregation:
            refused.append(
                "secure_aggregation (the coordinator must add up each client's Delta c_i, and "
                "secure aggregation sums the model only): turn it off"
            )
        if composition.dp:
            refused.append(
                "dp_clip_norm (DP-FedAvg clips and noises the model's change only; Delta c_i, a "
                "client's mean gradient, would travel in the clear): unset it"
            )
        if composition.dpsgd:
            refused.append(
                "dpsgd_noise_multiplier (the control variates are not part of DP-SGD's "
                "accounting): unset it"
            )
        if composition.aggregation != "fedavg":
            refused.append(
                f"aggregation = {composition.aggregation!r} (SCAFFOLD's updates of x and c are "
                'means): set aggregation = "fedavg"'
            )
        if composition.update_codec:
            refused.append(
                f"update codec {composition.update_codec!r} (codecs encode the model, not the "
                'control variates): use update_codec = "fp32" with update_topk = 0'
            )
        if composition.optimizer != "sgd" or composition.momentum != 0:
            refused.append(
                f"optimizer = {composition.optimizer!r} with momentum {composition.momentum:g} "
                "(option II's (x - y) / (K lr) is the mean corrected gradient only for plain "
                'SGD steps): set optimizer = "sgd" and momentum = 0'
            )
        if refused:
            raise ValueError("SCAFFOLD cannot run with " + "; ".join(refused))

    def client_settings(self) -> dict[str, SettingValue]:
        return {SCAFFOLD: True}

    def download_tensors(self, manifest: Manifest) -> StateDict:
        expected = control_manifest(manifest)
        if not self.control:
            self.control = {n: torch.zeros(s.shape, dtype=s.dtype) for n, s in expected.items()}
        elif manifest_of(self.control) != expected:
            raise ValueError(
                "the checkpointed SCAFFOLD control variate does not fit this model's tensors"
            )
        return {SERVER_CONTROL + name: tensor for name, tensor in self.control.items()}

    def upload_manifest(self, manifest: Manifest) -> Manifest:
        return {CONTROL_DELTA + name: spec for name, spec in control_manifest(manifest).items()}

    def set_population(self, clients: int) -> None:
        self._population = clients

    def begin(self, global_state: Mapping[str, torch.Tensor], manifest: Manifest) -> None:
        self._models = StreamingFedAvg(manifest, global_state)
        self._deltas = StreamingFedAvg(self.upload_manifest(manifest), {})

    def accumulate(self, update: Mapping[str, torch.Tensor], weight: float) -> None:
        assert self._models is not None and self._deltas is not None, "begin() first"
        self._models.add(update, weight)  # each reads only its own manifest's tensors
        self._deltas.add(update, weight)

    def finish(self) -> StateDict:
        assert self._models is not None and self._deltas is not None, "begin() first"
        self._contributors = self._deltas.num_updates
        _, self._mean_delta = split_control(self._deltas.result(), CONTROL_DELTA)
        models, self._models, self._deltas = self._models, None, None
        return models.result()

    def step(self, global_state: Mapping[str, torch.Tensor], aggregate: StateDict) -> StateDict:
        new: StateDict = {}
        for name, x in global_state.items():
            if not x.dtype.is_floating_point:
                new[name] = aggregate[name]  # counters: the aggregate's median, as FedAvg
                continue
            dtype = accumulator_dtype(x.dtype)
            x_acc = x.to(dtype)
            new[name] = (x_acc + self.eta * (aggregate[name].to(dtype) - x_acc)).to(x.dtype)
        if self._mean_delta:
            # |S| / N; N is at least the round's contributors (a client may join mid-round).
            scale = self._contributors / max(self._population, self._contributors)
            self.control = {  # new tensors: a snapshot of state_dict() stays as it was
                name: self.control.get(name, torch.zeros_like(delta)) + scale * delta
                for name, delta in self._mean_delta.items()
            }
            self._mean_delta = {}
        return new

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {_STATE + name: tensor for name, tensor in self.control.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if unknown := sorted(name for name in state if not name.startswith(_STATE)):
            raise ValueError(f"{self.name} has no state named {unknown[0]!r}")
        self.control = {name.removeprefix(_STATE): t.clone() for name, t in state.items()}
