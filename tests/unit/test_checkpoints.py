"""A checkpoint is resumed from only when its model verifies: hash and finite values."""

from __future__ import annotations

import hashlib
import json
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


def _as_format_1(checkpoint_json: Path) -> None:
    """Rewrite a checkpoint as a coordinator before BLAKE3 wrote it: SHA-256 digests."""
    document = json.loads(checkpoint_json.read_text())
    model = checkpoint_json.parent.parent / document.pop("model")
    document.pop("model_blake3")
    document.update(
        format="fedlink-checkpoint/1",
        model=model.name,
        model_sha256=hashlib.sha256(model.read_bytes()).hexdigest(),
        strategy_state_sha256=document.pop("strategy_state_blake3"),
    )
    checkpoint_json.write_text(json.dumps(document))


def test_a_checkpoint_from_before_blake3_resumes_after_its_sha256_is_checked(
    tmp_path: Path,
) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, tmp_path, 1, 0.5)
    _save(store, tmp_path, 2, 0.25)
    for number in (1, 2):
        _as_format_1(tmp_path / "checkpoints" / f"round-{number:06d}.json")
    latest = store.latest()
    assert latest is not None and latest.round == 2
    assert latest.model.info == PayloadFile.seal(latest.model.path).info  # served with BLAKE3
    # A model that does not match the recorded SHA-256 is refused: the round before is used.
    model = tmp_path / "global-000002.safetensors"
    model.write_bytes(model.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
    latest = store.latest()
    assert latest is not None and latest.round == 1


def test_a_model_that_does_not_match_its_checkpoint_is_not_resumed_from(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, keep=3)
    _save(store, tmp_path, 1, 0.5)
    _save(store, tmp_path, 2, 0.25)
    model = tmp_path / "global-000002.safetensors"
    model.write_bytes(model.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
    latest = store.latest()
    assert latest is not None and latest.round == 1
