"""A checkpoint is resumed from only when its model verifies: hash and finite values."""

from __future__ import annotations

from pathlib import Path

import torch

from fedlink.common.tensors import save_state_file
from fedlink.common.wire import PayloadFile
from fedlink.server.checkpoints import Checkpoint, CheckpointStore


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
