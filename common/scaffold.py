"""SCAFFOLD's control variates (Karimireddy et al. 2020, Algorithm 1, option II): what both sides
share.

On the wire the control variates travel inside the model's own safetensors payloads, under
reserved names: a training task carries the global model plus the server's control variate c as
`fedlink.scaffold.c/<tensor>`, and the client's result carries its trained model plus
Delta c_i as `fedlink.scaffold.delta_c/<tensor>`, for every floating tensor the federation
exchanges, in the accumulator dtype (float32; float64 for float64 tensors). The client's own
c_i stays on the client (`--state-dir`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from fedlink.common.errors import TaskError
from fedlink.common.tasks.base import ControlCorrection
from fedlink.common.tensors import StateDict, manifest_of, open_state_file

log = logging.getLogger(__name__)

# The task setting (a boolean) that tells a client the federation runs SCAFFOLD.
SCAFFOLD = "fedlink.scaffold"
SERVER_CONTROL = "fedlink.scaffold.c/"
CONTROL_DELTA = "fedlink.scaffold.delta_c/"


def split_control(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[StateDict, StateDict]:
    """(the tensors not under `prefix`, those under it with the prefix removed)."""
    plain: StateDict = {}
    extra: StateDict = {}
    for name, tensor in state.items():
        if name.startswith(prefix):
            extra[name.removeprefix(prefix)] = tensor
        else:
            plain[name] = tensor
    return plain, extra


def next_client_control(
    *,
    client: Mapping[str, torch.Tensor],
    server: Mapping[str, torch.Tensor],
    start: Mapping[str, torch.Tensor],
    trained: Mapping[str, torch.Tensor],
    steps: int,
    learning_rate: float,
    stepped: frozenset[str],
) -> tuple[StateDict, StateDict]:
    """Option II: c_i+ = c_i - c + (x - y) / (K lr), and Delta c_i = c_i+ - c_i.

    `client` is c_i, `server` c, `start` the global model x the client received, `trained` its
    model y after K = `steps` local SGD steps of learning rate lr. Only tensors in `stepped` (the
    parameters the SGD steps moved) get the rule; the others (BatchNorm's running statistics,
    parameters that are not trained) are not gradient steps, so their c_i stays as it was and
    their Delta c_i is 0. Computed in c's dtype; returns (c_i+, Delta c_i).
    """
    if steps < 1:
        raise TaskError(
            "the federation runs SCAFFOLD but the task took no corrected step (K = 0): its "
            "train() must pass the TrainConfig to train_supervised/train_classifier, or call "
            "add_control_correction on its optimizer (docs/tasks.md); no update was sent"
        )
    new: StateDict = {}
    delta: StateDict = {}
    for name, c in server.items():
        c_i = client[name]
        if name in stepped:
            moved = (start[name].to(c.dtype) - trained[name].to(c.dtype)) / (steps * learning_rate)
            new[name] = c_i - c + moved
            delta[name] = new[name] - c_i
        else:
            new[name] = c_i.clone()
            delta[name] = torch.zeros_like(c_i)
    return new, delta


def control_correction(
    model: torch.nn.Module, server: Mapping[str, torch.Tensor], client: Mapping[str, torch.Tensor]
) -> ControlCorrection:
    """c - c_i for the parameters of `model` that are trained (by state_dict name)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return ControlCorrection(
        {name: c - client[name] for name, c in server.items() if name in trained}
    )


def read_client_control(path: Path, server: Mapping[str, torch.Tensor]) -> StateDict | None:
    """c_i as kept in `path` (safetensors), or None when there is none or it does not fit the
    coordinator's c `server` (names, dtypes, shapes: then with a warning, and c_i starts at 0)."""
    if not path.exists():
        return None
    with open_state_file(path) as state:
        if manifest_of(state) == manifest_of(server):
            return {name: tensor.clone() for name, tensor in state.items()}
    log.warning("%s does not fit the coordinator's control variate; starting at 0", path)
    return None
