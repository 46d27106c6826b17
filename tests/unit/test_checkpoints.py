"""A checkpoint is resumed from only when its model verifies: hash and finite values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fedlink.common.config import load_config
from fedlink.common.errors import ConfigError
from fedlink.common.tensors import save_state_file
from fedlink.common.wire import PayloadFile
from fedlink.server.checkpoints import Checkpoint, CheckpointStore, check_resumable, run_identity
from fedlink.server.config import ServerConfig


def _save(store: CheckpointStore, state_dir: Path, round_number: int, value: float) -> None:
    path = state_dir / f"global-{round_number:06d}.safetensors"
    save_state_file({"w": torch.full((3,), value), "steps": torch.tensor(round_number)}, path)
    store.save(
        Checkpoint(
            round=round_number,
            model=PayloadFile.seal(path),
            clients=("a",),
            record={"round": round_number},
            run={"task": "digits", "seed": 0},
        )
    )


def test_a_checkpoint_whose_model_is_not_finite_is_never_resumed_from(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, tmp_path, 1, 0.5)
    # A model file with Inf and a matching hash: not something this coordinator writes (it
    # checks every aggregate), so a copied-in or older poisoned state directory.
    _save(store, tmp_path, 2, float("inf"))
    latest = store.latest()
    assert latest is not None and latest.round == 1


def test_a_partial_run_cannot_be_resumed_exchanging_other_tensors(tmp_path: Path) -> None:
    model = tmp_path / "global-000001.safetensors"
    save_state_file({"head.weight": torch.zeros(1)}, model)

    def config(**overrides: object) -> ServerConfig:
        return load_config(ServerConfig, overrides={"insecure": True, **overrides}, environ={})

    partial = config(exchanged_tensors=["head.*"])
    checkpoint = Checkpoint(1, PayloadFile.seal(model), (), {}, run_identity(partial))
    check_resumable(checkpoint, run_identity(partial))
    with pytest.raises(ConfigError, match=re.escape("exchanged_tensors=['head.*']")):
        check_resumable(checkpoint, run_identity(config()))
    # A checkpoint from before partial models exchanged every tensor.
    older = Checkpoint(1, PayloadFile.seal(model), (), {}, {"task": "digits", "seed": 0})
    check_resumable(older, run_identity(config()))
    with pytest.raises(ConfigError, match="local_tensors"):
        check_resumable(older, run_identity(config(local_tensors=["bn*"])))
