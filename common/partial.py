"""Partial models: which of a model's tensors travel, which stay on each site, which are frozen.

One rule decides it, from two lists of shell-style patterns over tensor names (`fnmatch`):
`local_tensors` never leave a site and are never aggregated (FedBN: the batch-norm layers);
`exchanged_tensors`, when given, are the only others that travel (LoRA adapters, a new head).
Every tensor that neither travels nor stays local is frozen: each site loads it from its own
files (the pretrained checkpoint its task reads), and at join the client compares the SHA-256 of
its frozen tensors with the coordinator's, refusing to take part when they differ, since an
update trained on other frozen weights does not fit the federation's model.

The global model, every download, upload, checkpoint and aggregate hold the travelling tensors
only: the round engine and the wire never see the rest.
"""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedlink.common.errors import ConfigError
from fedlink.common.tensors import StateDict

# A coordinator's patterns are checked by the client too: bounded in number and length.
MAX_PATTERNS = 64
MAX_PATTERN_CHARS = 256


@dataclass(frozen=True)
class TensorSelection:
    exchanged: tuple[str, ...] = ()  # empty: every tensor that is not local
    local: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key, patterns in (("exchanged_tensors", self.exchanged), ("local_tensors", self.local)):
            if len(patterns) > MAX_PATTERNS:
                raise ConfigError(f"{key}: at most {MAX_PATTERNS} patterns, got {len(patterns)}")
            for pattern in patterns:
                if not pattern or len(pattern) > MAX_PATTERN_CHARS:
                    raise ConfigError(
                        f"{key}: a pattern must have 1 to {MAX_PATTERN_CHARS} characters"
                    )

    @property
    def partial(self) -> bool:
        return bool(self.exchanged or self.local)

    def is_local(self, name: str) -> bool:
        return _matches(name, self.local)

    def travels(self, name: str) -> bool:
        if self.is_local(name):
            return False
        return not self.exchanged or _matches(name, self.exchanged)

    def travelling(self, state: Mapping[str, torch.Tensor]) -> StateDict:
        return {name: tensor for name, tensor in state.items() if self.travels(name)}

    def frozen(self, state: Mapping[str, torch.Tensor]) -> StateDict:
        return {
            name: tensor
            for name, tensor in state.items()
            if not self.travels(name) and not self.is_local(name)
        }

    def local_part(self, state: Mapping[str, torch.Tensor]) -> StateDict:
        return {name: tensor for name, tensor in state.items() if self.is_local(name)}

    def freeze(self, model: torch.nn.Module) -> None:
        """Stop `model` training its frozen parameters (`requires_grad` False): a site that
        trained one would drift, unseen, from the weights every other site holds and from the
        hash checked at join. Buffers are the task's to keep still (a frozen batch norm in
        eval mode)."""
        frozen = self.frozen(dict(model.named_parameters()))
        for parameter in frozen.values():
            parameter.requires_grad_(False)

    def check_model(self, names: Iterable[str]) -> None:
        """Every pattern names a tensor of the model, and some tensor travels (ConfigError)."""
        names = list(names)
        for key, patterns in (("exchanged_tensors", self.exchanged), ("local_tensors", self.local)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    raise ConfigError(
                        f"{key}: pattern {pattern!r} matches no tensor of the model "
                        f"(its tensors are named like {', '.join(repr(n) for n in names[:4])})"
                    )
        if not any(self.travels(name) for name in names):
            raise ConfigError(
                "exchanged_tensors and local_tensors leave no tensor of the model to exchange"
            )


def federated_part(
    selection: TensorSelection, state: Mapping[str, torch.Tensor], pinned: str | None
) -> tuple[StateDict, bytes]:
    """The coordinator's side: the travelling part of its model (the federation's global
    model) and the SHA-256 of its frozen part, which must equal `pinned` when that is set."""
    selection.check_model(state)
    digest = frozen_digest(selection.frozen(state))
    if pinned is not None and digest.hex() != pinned:
        found = digest.hex() if digest else "nothing (no tensor of the model is frozen)"
        raise ConfigError(
            f"frozen_sha256 is {pinned}, but the frozen tensors of the coordinator's model hash "
            f"to {found}: load the pretrained weights the federation agreed on, or correct "
            "frozen_sha256"
        )
    return selection.travelling(state), digest


def frozen_digest(state: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over the tensors' names, dtypes, shapes and values, in name order; b"" when there
    are none. `fedlink` logs it at start-up, to pin in the coordinator's `frozen_sha256`."""
    if not state:
        return b""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        shape = ",".join(map(str, tensor.shape))
        digest.update(f"{name}\t{str(tensor.dtype).removeprefix('torch.')}\t{shape}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)  # no copy
    return digest.digest()


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)
