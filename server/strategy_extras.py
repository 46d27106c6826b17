"""A strategy's extra tensors on the wire (`Strategy.download_tensors` and `upload_manifest`:
SCAFFOLD's control variates): their names checked at start-up, and each round's training task
payload, which carries them beside the global model. The published model and the checkpoints
never hold them."""

from __future__ import annotations

from pathlib import Path

from fedlink.common.errors import ConfigError
from fedlink.common.task_settings import RESERVED_PREFIX
from fedlink.common.tensors import Manifest, manifest_of, open_state_file, save_state_file
from fedlink.common.wire import PayloadFile
from fedlink.server.strategy import Strategy


class StrategyExtras:
    def __init__(self, strategy: Strategy, manifest: Manifest, state_dir: Path) -> None:
        """Refuse (ConfigError) extra tensors outside the reserved names, or a model that uses
        them."""
        self._strategy = strategy
        self._manifest = manifest
        self._state_dir = state_dir
        try:
            down = manifest_of(strategy.download_tensors(manifest))
        except ValueError as exc:
            raise ConfigError(f"strategy {strategy!r}: {exc}") from None
        up = strategy.upload_manifest(manifest)
        if bad := sorted(name for name in [*down, *up] if not name.startswith(RESERVED_PREFIX)):
            raise ConfigError(
                f"strategy {strategy!r} names extra tensors outside {RESERVED_PREFIX!r}: "
                f"{', '.join(bad[:5])}"
            )
        if (down or up) and (
            clash := sorted(name for name in manifest if name.startswith(RESERVED_PREFIX))
        ):
            raise ConfigError(
                f"the model has tensors named {', '.join(clash[:5])}: names starting with "
                f"{RESERVED_PREFIX!r} are reserved for the extra tensors of strategy "
                f"{strategy!r}; rename them in the task's model"
            )
        # What every training result carries beside the model (checked with it at intake).
        self.upload: Manifest = up

    def task_payload(self, global_file: PayloadFile, round_number: int) -> PayloadFile | None:
        """The training task's download when the strategy sends extra tensors: the global model
        and those, in one safetensors file; None when it sends none. Earlier rounds' task files
        are removed."""
        extra = self._strategy.download_tensors(self._manifest)
        self.remove_task_payloads()
        if not extra:
            return None
        path = self._state_dir / f"task-{round_number:06d}.safetensors"
        with open_state_file(global_file.path) as global_state:
            written = save_state_file({**global_state, **extra}, path, durable=False)
            return PayloadFile(path, written.info)  # hashed from memory, not read back

    def remove_task_payloads(self) -> None:
        for path in self._state_dir.glob("task-*.safetensors"):
            path.unlink(missing_ok=True)
