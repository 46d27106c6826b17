"""Checkpoints: what a restarted coordinator needs to resume from the last completed round.

A checkpoint is a small JSON file, `checkpoints/round-NNNNNN.json`, that names the round's global
model file in the state directory and holds its BLAKE3 digest, the round state (clients known to the
federation, the round's metrics record) and what the run was started with. Both files are
written atomically and durably (temp file, fsync, rename, fsync of the directory) and the JSON
only after the model it names, so a crash never leaves a checkpoint pointing at a partial model.
A checkpoint whose JSON does not parse, or whose model is missing or does not hash to the
recorded digest, is skipped with a warning and the one before it is used.

With differential privacy on, `privacy` holds the accountant's history (each mechanism applied
and for how many rounds), so a resumed run continues the accounting where it stopped. The field
is optional: a checkpoint written before it existed loads with an empty history.

A strategy with state (a server optimizer's moments) has it saved beside the JSON as
`round-NNNNNN.strategy.safetensors`, written first and named in the JSON with its digest, so a
resumed run steps exactly as an uninterrupted one would.

Checkpoints written before payloads were hashed with BLAKE3 (format 1) name SHA-256 digests:
they are verified as such, so a coordinator upgraded mid-run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlink.common.accounting import MechanismStep, compact
from fedlink.common.errors import ConfigError, TensorFormatError
from fedlink.common.storage import write_durably
from fedlink.common.tensors import open_state_file, save_state_file
from fedlink.common.wire import PayloadFile
from fedlink.server.config import ServerConfig
from fedlink.server.validation import non_finite_tensors

log = logging.getLogger(__name__)

FORMAT = "fedlink-checkpoint/2"
# Format 1 is format 2 with SHA-256 where format 2 has BLAKE3 (the payloads' hash).
_SHA256_FORMAT = "fedlink-checkpoint/1"
_NAME = re.compile(r"round-(\d{6,})\.json")


@dataclass(frozen=True)
class Checkpoint:
    round: int
    model: PayloadFile  # the round's global model (safetensors, in the state directory), described
    clients: tuple[str, ...]  # every identity that has joined, for sampling after a restart
    record: Mapping[str, Any]  # the round's metrics.jsonl row
    run: Mapping[str, Any]  # what the run was started with (task, seed): must match on resume
    privacy: tuple[MechanismStep, ...] = ()  # the privacy accountant's history (DP runs)
    strategy_state: Mapping[str, torch.Tensor] = field(default_factory=dict)  # e.g. FedAdam's


class CheckpointStore:
    """Writes a checkpoint after each completed round and finds the newest good one."""

    def __init__(self, state_dir: Path, keep: int) -> None:
        self._state_dir = state_dir
        self._dir = state_dir / "checkpoints"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._keep = keep

    def save(self, checkpoint: Checkpoint) -> None:
        self.commit(checkpoint, self.save_strategy_state(checkpoint))

    def save_strategy_state(self, checkpoint: Checkpoint) -> PayloadFile | None:
        """The first half of `save`: the strategy's state, durably, while it is what the round
        left (the next round changes it)."""
        if not checkpoint.strategy_state:
            return None
        strategy_path = self._dir / f"round-{checkpoint.round:06d}.strategy.safetensors"
        save_state_file(checkpoint.strategy_state, strategy_path, durable=True)
        return PayloadFile.seal(strategy_path)

    def commit(self, checkpoint: Checkpoint, strategy_file: PayloadFile | None) -> None:
        """The second half of `save`: the JSON that makes the checkpoint, once its model file
        (and `strategy_file`) are on disk; then the oldest beyond `keep` are deleted."""
        document = {
            "format": FORMAT,
            "round": checkpoint.round,
            "model": checkpoint.model.path.name,
            "model_blake3": checkpoint.model.info.blake3.hex(),
            "clients": list(checkpoint.clients),
            "record": dict(checkpoint.record),
            "run": dict(checkpoint.run),
            "privacy": [
                {
                    "noise_multiplier": step.noise_multiplier,
                    "sample_rate": step.sample_rate,
                    "steps": step.steps,
                }
                for step in compact(checkpoint.privacy)
            ],
            "strategy_state": strategy_file.path.name if strategy_file else None,
            "strategy_state_blake3": strategy_file.info.blake3.hex() if strategy_file else None,
        }
        path = self._dir / f"round-{checkpoint.round:06d}.json"
        write_durably(path, json.dumps(document, indent=1).encode())
        for old in self._rounds()[: -self._keep]:
            (self._dir / f"round-{old:06d}.json").unlink(missing_ok=True)
            (self._dir / f"round-{old:06d}.strategy.safetensors").unlink(missing_ok=True)

    def retained_rounds(self) -> list[int]:
        """Rounds whose checkpoints are kept (their model files must be kept too)."""
        return self._rounds()

    def latest(self) -> Checkpoint | None:
        """The newest checkpoint that verifies; None when there is none at all.

        Raises ConfigError when checkpoints exist but none of them is usable: silently starting
        a new run over a damaged one would throw away the training done so far.
        """
        rounds = self._rounds()
        for number in reversed(rounds):
            path = self._dir / f"round-{number:06d}.json"
            try:
                return self._load(path)
            except (OSError, ValueError, KeyError, TypeError, TensorFormatError) as exc:
                log.warning("checkpoint %s is unusable (%s); trying the previous one", path, exc)
        if rounds:
            raise ConfigError(
                f"none of the {len(rounds)} checkpoints in {self._dir} is usable; move the state "
                "directory away to start a new run"
            )
        return None

    def _load(self, path: Path) -> Checkpoint:
        document = json.loads(path.read_text())
        if document.get("format") not in (FORMAT, _SHA256_FORMAT):
            raise ValueError(f"unknown checkpoint format {document.get('format')!r}")
        # Sealing hashes the model once; the resumed engine serves it as the global payload.
        model = PayloadFile.seal(self._state_dir / Path(document["model"]).name)
        _verify(model, document, "model")
        with open_state_file(model.path) as state:
            broken = non_finite_tensors(state)
        if broken:
            # Never written by this coordinator (it checks every aggregate), so the file was
            # produced elsewhere: resuming from it would publish a poisoned model.
            raise ValueError(f"{model.path.name} holds NaN or Inf in {', '.join(broken[:5])}")
        strategy_state = {}
        if document.get("strategy_state"):
            strategy_file = PayloadFile.seal(self._dir / Path(document["strategy_state"]).name)
            _verify(strategy_file, document, "strategy_state")
            with open_state_file(strategy_file.path) as state:
                strategy_state = {name: tensor.clone() for name, tensor in state.items()}
        return Checkpoint(
            round=int(document["round"]),
            model=model,
            clients=tuple(str(c) for c in document["clients"]),
            record=dict(document["record"]),
            run=dict(document["run"]),
            privacy=tuple(
                MechanismStep(
                    float(step["noise_multiplier"]), float(step["sample_rate"]), int(step["steps"])
                )
                for step in document.get("privacy", [])
            ),
            strategy_state=strategy_state,
        )

    def _rounds(self) -> list[int]:
        return sorted(
            int(m.group(1)) for p in self._dir.iterdir() if (m := _NAME.fullmatch(p.name))
        )


# What a checkpoint written before a key existed was run with.
_RUN_DEFAULTS: dict[str, Any] = {"strategy": "fedavg", "exchanged_tensors": [], "local_tensors": []}


def run_identity(config: ServerConfig) -> dict[str, Any]:
    """What a resumed run must share with the original: the same task, seed and strategy (a
    strategy's checkpointed state means nothing to another one), and the same tensors exchanged
    (the checkpointed global model holds only those)."""
    return {
        "task": config.task,
        "seed": config.seed,
        "strategy": config.strategy,
        "exchanged_tensors": list(config.exchanged_tensors),
        "local_tensors": list(config.local_tensors),
    }


def check_resumable(checkpoint: Checkpoint, run: Mapping[str, Any]) -> None:
    """Refuse to resume a run that was started with a different task, seed or strategy."""
    for key, value in run.items():
        recorded = checkpoint.run.get(key, _RUN_DEFAULTS.get(key))
        if recorded != value:
            raise ConfigError(
                f"the state directory holds a run with {key}={recorded!r}, but this "
                f"coordinator was started with {key}={value!r}; use the original settings to "
                "resume it, or another --state-dir for a new run"
            )


def _verify(file: PayloadFile, document: Mapping[str, Any], key: str) -> None:
    """`file` hashes to the digest the checkpoint recorded for it under `key`."""
    if document["format"] == _SHA256_FORMAT:
        algorithm, expected = "SHA-256", str(document[f"{key}_sha256"])
        digest = hashlib.sha256()
        with open(file.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        actual = digest.hexdigest()
    else:
        algorithm, expected = "BLAKE3", str(document[f"{key}_blake3"])
        actual = file.info.blake3.hex()
    if actual != expected:
        raise ValueError(
            f"{file.path.name} has {algorithm} {actual[:12]}…, expected {expected[:12]}…"
        )
