"""The federation's model on this site: the coordinator's terms taken at join, the global model
loaded into it, local training and evaluation, and what the site keeps between rounds (tensors
that never travel, top-k's residual, SCAFFOLD's control variate, DP-SGD's privacy spent).

Knows nothing of the transport: `client/app.py` downloads and uploads, this module turns a
download into a model and a trained model into an update file.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedlink.client.attacks import Attack, parse_attack
from fedlink.client.config import ClientConfig
from fedlink.client.settings import (
    FatalClientError,
    checked_control,
    task_settings_from,
    train_config_from,
)
from fedlink.common.accounting import PrivacyAccountant
from fedlink.common.codecs import UpdateCodec, codec_from_proto, compress_update
from fedlink.common.errors import ConfigError, TaskError, UpdateRejected
from fedlink.common.partial import TensorSelection, frozen_digest
from fedlink.common.scaffold import (
    CONTROL_DELTA,
    SERVER_CONTROL,
    control_correction,
    next_client_control,
    read_client_control,
    split_control,
)
from fedlink.common.task_settings import split_settings
from fedlink.common.tasks import load_task
from fedlink.common.tasks.base import (
    ClientData,
    ControlCorrection,
    DataRequest,
    DPSGDConfig,
    TaskModule,
    TrainConfig,
    TrainResult,
)
from fedlink.common.tasks.contract import Evaluation, evaluate
from fedlink.common.tasks.training import check_dpsgd_model
from fedlink.common.tensors import (
    StateDict,
    first_difference,
    manifest_digest,
    manifest_entries,
    manifest_of,
    open_state_file,
    save_state_file,
    state_payload,
)
from fedlink.common.threads import size_torch_threads
from fedlink.common.wire import PayloadBuffers
from fedlink.v1 import federation_pb2 as pb

log = logging.getLogger(__name__)


def pick_device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if choice == "auto":
        return torch.device("cuda")
    device = torch.device(choice)  # "cuda" or "cuda:N", checked by ClientConfig
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available == 0:
        raise ConfigError(f"--device {choice} was requested but no CUDA device is available")
    if device.index is not None and device.index >= available:
        raise ConfigError(
            f"--device {choice} was requested but this machine has {available} CUDA "
            f"device(s): cuda:0 to cuda:{available - 1}"
        )
    return device


@dataclass(frozen=True)
class TrainedUpdate:
    """A training task's answer: what to report, the update to upload (None: this client
    declines the round) and, under SCAFFOLD, c_i+ to keep once the coordinator takes it."""

    num_examples: int
    metrics: dict[str, float]
    payload: PayloadBuffers | None
    next_control: StateDict | None = None


class LocalSite:
    def __init__(self, config: ClientConfig) -> None:
        self._config = config
        self.task: TaskModule = load_task(config.task)
        self.device = pick_device(config.device)
        self.threads = size_torch_threads(config.threads)
        self._data: ClientData = self.task.load_data(
            DataRequest(
                partition=config.partition,
                partition_index=config.partition_index,
                num_partitions=config.num_partitions,
                seed=config.seed,
                data_dir=config.data_dir,
            )
        )
        self.model = self.task.build_model().to(self.device)
        self._attack: Attack | None = None
        if config.simulate_attack is not None:  # evaluation only, never a default
            self._attack = parse_attack(config.simulate_attack, config.num_partitions)
        if config.state_dir is not None:
            try:
                config.state_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"--state-dir {config.state_dir} is not usable: {exc.strerror or exc}"
                ) from None
        # What Join said: the hyper-parameters and this client's identity.
        self._task_config: Mapping[str, str] = {}
        self._identity: str | None = None
        # Which tensors travel (the coordinator's patterns, from Join); the rest stay here.
        self._selection = TensorSelection()
        # Top-k error feedback: what earlier updates did not send (loaded from --state-dir).
        self._residual: StateDict | None = None
        # Record-level DP-SGD: every round's local steps compose, for as long as this process runs.
        self._dpsgd_accountant = PrivacyAccountant()
        # SCAFFOLD: the server's control variate c from the last training download, and this
        # client's c_i (loaded from --state-dir on first use, kept there after every round).
        self._server_control: StateDict = {}
        self._client_control: StateDict | None = None
        # False while a download is being written into the model (client/download.py): until
        # its digest is checked, the model must not be trained, evaluated or sent.
        self._model_ready = True

    @property
    def attacking(self) -> bool:
        return self._attack is not None

    def adopt(self, reply: pb.JoinReply) -> None:
        """Take the coordinator's terms from its Join reply, or refuse them (FatalClientError):
        the training settings (and a model DP-SGD cannot train, before round 1), which tensors
        travel, the model's manifest and the frozen tensors' hash. Then freeze what does not
        travel and restore what stays on this site."""
        if train_config_from(reply.task_config, seed=0).dpsgd is not None:
            try:
                check_dpsgd_model(self.model)
            except TaskError as exc:
                raise FatalClientError(f"task {reply.task!r}: {exc}") from None
        try:
            self._selection = TensorSelection(
                tuple(reply.exchanged_tensors), tuple(reply.local_tensors)
            )
        except ConfigError as exc:
            raise FatalClientError(f"coordinator sent invalid tensor patterns: {exc}") from None
        self._check_model(reply)
        self._check_frozen(reply)
        self._selection.freeze(self.model)  # what the federation does not exchange never trains
        self._task_config = reply.task_config
        self._identity = reply.identity
        self._restore_local_tensors()

    def _check_model(self, reply: pb.JoinReply) -> None:
        """Refuse to take part with a model other than the coordinator's (names, dtypes,
        shapes), naming the first tensor that differs, before any round is started."""
        if not reply.model_manifest_sha256:
            return  # a coordinator that sends no fingerprint: checked at the first download
        ours = manifest_entries(manifest_of(self.travelling()))
        if manifest_digest(ours) == reply.model_manifest_sha256:
            return
        theirs = [(e.name, e.dtype, tuple(e.shape)) for e in reply.model_manifest]
        difference = (first_difference(theirs, ours) if theirs else None) or (
            "the model fingerprints differ"
        )
        raise FatalClientError(
            f"task {self._config.task!r} builds a different model than the coordinator's: "
            f"{difference}; run the same version of the task, with the same settings, as the "
            "coordinator"
        )

    def _check_frozen(self, reply: pb.JoinReply) -> None:
        """Refuse to take part when the frozen tensors (loaded by this site's task from its own
        files) are not the ones the coordinator's model has."""
        ours = frozen_digest(self._selection.frozen(self.model.state_dict()))
        if ours == reply.frozen_sha256:
            return
        theirs = reply.frozen_sha256.hex() or "nothing (no frozen tensors)"
        raise FatalClientError(
            f"this site's frozen tensors (those the federation does not exchange) hash to SHA-256 "
            f"{ours.hex() or 'nothing (no frozen tensors)'} but the coordinator's to {theirs}: "
            f"load the same pretrained weights as the coordinator in task {self._config.task!r}"
        )

    def travelling(self) -> StateDict:
        """The tensors of this client's model that the federation exchanges."""
        return self._selection.travelling(self.model.state_dict())

    def travelling_copy(self) -> StateDict:
        """A copy of the travelling tensors (the global model, before local training)."""
        return {name: tensor.detach().clone() for name, tensor in self.travelling().items()}

    def _state_file(self, prefix: str) -> Path | None:
        """Where this site keeps `prefix` between runs (None: no --state-dir, or not joined)."""
        if self._config.state_dir is None or self._identity is None:
            return None
        return self._config.state_dir / f"{prefix}-{self._identity}.safetensors"

    def _restore_local_tensors(self) -> None:
        """Tensors that never leave this site (FedBN's batch norms), as the last round left them."""
        stored = self._state_file("local-tensors") if self._selection.local else None
        if stored is None or not stored.exists():
            return
        expected = manifest_of(self._selection.local_part(self.model.state_dict()))
        with open_state_file(stored) as local:
            if manifest_of(local) != expected:
                log.warning("%s does not fit this model's local tensors; not restored", stored)
                return
            self.model.load_state_dict(local, strict=False)
        log.info("restored %d local tensor(s) from %s", len(expected), stored)

    def download_targets(self, *, with_control: bool) -> StateDict | None:
        """The tensors a download may be written straight into (client/download.py checks the
        layout, device and memory): the travelling ones, unless the download carries SCAFFOLD's
        control variate or a module loads its state its own way (then None: through the spool
        and `load_global`)."""
        if with_control or not _loads_plainly(self.model):
            return None
        return self.travelling()

    def begin_download(self) -> None:
        """A download starts: the model may be half overwritten until it is loaded."""
        self._model_ready = False

    def loaded_in_place(self) -> None:
        """The download written into `download_targets` passed its digest check."""
        self._model_ready = True

    def _require_model(self) -> None:
        if not self._model_ready:
            raise RuntimeError("the global model's download did not complete; it cannot be used")

    def load_global(self, state: Mapping[str, torch.Tensor], *, with_control: bool) -> None:
        """Load a downloaded global model; `with_control` (SCAFFOLD's training tasks): the
        download also carries the server's control variate c, which is kept for training."""
        model, control = split_control(state, SERVER_CONTROL) if with_control else (state, {})
        travelling = self.travelling()
        if model.keys() != travelling.keys():
            raise FatalClientError(
                "the coordinator sent a model with other tensors than the federation "
                "exchanges (its manifest at join)"
            )
        if with_control:
            self._server_control = checked_control(control, travelling)
        # Only the travelling tensors: local and frozen ones stay as they are.
        self.model.load_state_dict(model, strict=not self._selection.partial)
        self._model_ready = True

    def train(
        self, header: pb.TaskHeader, control: ControlCorrection | None = None
    ) -> tuple[TrainResult, dict[str, float], TrainConfig]:
        """Train the loaded global model on the local data (with SCAFFOLD's `control`
        correction); the result, the metrics a plaintext result reports (the loss and, with
        DP-SGD, the epsilon spent so far) and the settings it trained with."""
        self._require_model()
        config = train_config_from(
            self._task_config, seed=header.seed, settings=task_settings_from(header)
        )
        config = dataclasses.replace(config, scaffold=control)
        torch.manual_seed(header.seed)
        if self._attack is None:
            result = self.task.train(self.model, self._data, config, self.device)
        else:
            log.warning(
                "round %d: SIMULATED %s ATTACK: poisoning this update",
                header.round,
                self._attack.name,
            )
            result = self._attack.train(self.task, self.model, self._data, config, self.device)
        log.info(
            "round %d: trained on %d examples, loss %.4f%s",
            header.round,
            result.num_examples,
            result.loss,
            f" (FedProx proximal term mu={config.proximal_mu:g})" if config.proximal_mu else "",
        )
        local = self._state_file("local-tensors") if self._selection.local else None
        if local is not None:  # kept for a restart: they exist nowhere else
            save_state_file(self._selection.local_part(self.model.state_dict()), local)
        metrics = {"loss": result.loss}
        if config.dpsgd is not None:
            metrics["dpsgd_epsilon"] = self._account_dpsgd(header.round, config.dpsgd, result)
        return result, metrics, config

    def train_update(self, header: pb.TaskHeader, scaffold: bool) -> TrainedUpdate:
        """Train, and make the update the coordinator asked for (its codec; with SCAFFOLD's
        Delta c_i) as a payload that streams from the tensors' memory (`state_payload`): no
        file and no second copy of the model. Nothing changes the model until it is sent: the
        client does one task at a time."""
        try:
            codec = codec_from_proto(header.update_codec)
        except ConfigError as exc:
            raise FatalClientError(f"coordinator sent an invalid update codec: {exc}") from None
        if scaffold and not codec.plain:
            raise FatalClientError(
                f"the coordinator runs SCAFFOLD with update codec {codec.describe()!r}; "
                "SCAFFOLD's control variates travel uncompressed"
            )
        # An encoded update is the change from the model the round started from (SCAFFOLD's
        # control variate update needs it too).
        global_state = {} if codec.plain and not scaffold else self.travelling_copy()
        control = self._control_correction() if scaffold else None
        result, metrics, config = self.train(header, control)
        extra: StateDict = {}
        client_control: StateDict | None = None
        if control is not None:
            client_control, delta = self._next_control(header, control, global_state, config)
            extra = {CONTROL_DELTA + name: tensor for name, tensor in delta.items()}
        if codec.plain:
            update = {**self.travelling(), **extra}
        else:
            try:
                update = self._encode_update(codec, global_state)
            except UpdateRejected as exc:
                # Declined: the coordinator refuses a result without payload at once.
                log.error("round %d: cannot encode this update: %s", header.round, exc)
                return TrainedUpdate(result.num_examples, metrics, None)
        payload = state_payload(update, codec.encoding)
        log.info(
            "round %d: uploading update (%.3f MB, %s)",
            header.round,
            payload.size / 1e6,
            codec.describe(),
        )
        return TrainedUpdate(result.num_examples, metrics, payload, client_control)

    def evaluate(self, header: pb.TaskHeader) -> Evaluation:
        """The loaded global model on the local test data (the training data without any)."""
        self._require_model()
        dataset = self._data.test if self._data.test is not None else self._data.train
        task_settings, _ = split_settings(task_settings_from(header))
        return evaluate(self.task, self.model, dataset, self.device, task_settings)

    def _control_correction(self) -> ControlCorrection:
        """SCAFFOLD's c - c_i for the parameters this client trains (by state_dict name)."""
        client = self._load_client_control()
        return control_correction(self.model, self._server_control, client)

    def _next_control(
        self,
        header: pb.TaskHeader,
        control: ControlCorrection,
        start: StateDict,
        config: TrainConfig,
    ) -> tuple[StateDict, StateDict]:
        """(c_i+, Delta c_i) after K local steps (option II)."""
        assert self._client_control is not None
        try:
            new, delta = next_client_control(
                client=self._client_control,
                server=self._server_control,
                start=start,
                trained=self.travelling(),
                steps=control.steps,
                learning_rate=config.learning_rate,
                stepped=frozenset(control.correction),
            )
        except TaskError as exc:
            raise FatalClientError(f"task {self._config.task!r}: {exc}") from None
        log.info(
            "round %d: SCAFFOLD control variate updated after %d steps", header.round, control.steps
        )
        return new, delta

    def _load_client_control(self) -> StateDict:
        """c_i: as the last round left it, from memory or --state-dir; zeros at first (and,
        with a warning, when what is stored does not fit the coordinator's c)."""
        expected = manifest_of(self._server_control)
        if self._client_control is not None and manifest_of(self._client_control) == expected:
            return self._client_control
        stored = self._state_file("scaffold-control")
        if stored is None:
            log.warning(
                "SCAFFOLD: this client's control variate is kept in memory only and will not "
                "survive a restart; start the client with --state-dir to keep it"
            )
        elif (restored := read_client_control(stored, self._server_control)) is not None:
            log.info("SCAFFOLD: restored this client's control variate from %s", stored)
            self._client_control = restored
            return restored
        self._client_control = {
            name: torch.zeros_like(c) for name, c in self._server_control.items()
        }
        return self._client_control

    def keep_client_control(self, control: StateDict) -> None:
        """c_i+ once the coordinator took Delta c_i: c stays the mean of the c_i."""
        self._client_control = control
        stored = self._state_file("scaffold-control")
        if stored is not None:
            save_state_file(control, stored)

    def _encode_update(self, codec: UpdateCodec, global_state: StateDict) -> StateDict:
        """The trained model's change from `global_state` in `codec`; with top-k, what was not
        sent is kept (in --state-dir as safetensors, if set) for the next update."""
        if codec.topk and self._residual is None:
            self._residual = {}
            stored = self._state_file("update-residual")
            if stored is not None and stored.exists():
                with open_state_file(stored) as residual:
                    self._residual = {name: t.clone() for name, t in residual.items()}
        payload, kept = compress_update(
            codec,
            self.travelling(),
            global_state,
            self._residual or {},
        )
        if codec.topk:
            self._residual = kept
            stored = self._state_file("update-residual")
            if stored is not None:
                save_state_file(kept, stored)
        return payload

    def _account_dpsgd(self, round_number: int, dpsgd: DPSGDConfig, result: TrainResult) -> float:
        """This round's DP-SGD steps composed with the earlier rounds': the epsilon spent so far."""
        if result.dpsgd is None:
            raise FatalClientError(
                f"the coordinator asks for record-level DP-SGD but task {self._config.task!r} "
                "trained without it (its train() must pass the TrainConfig to train_classifier, "
                "or return TrainResult.dpsgd); no update was sent"
            )
        self._dpsgd_accountant.step(result.dpsgd)
        epsilon = self._dpsgd_accountant.epsilon(dpsgd.delta)
        log.info(
            "round %d: DP-SGD epsilon %.4f at delta %g (this round: %d steps, z %g, q %.4g)",
            round_number,
            epsilon,
            dpsgd.delta,
            result.dpsgd.steps,
            result.dpsgd.noise_multiplier,
            result.dpsgd.sample_rate,
        )
        return epsilon


def _loads_plainly(model: torch.nn.Module) -> bool:
    """Whether `load_state_dict` only copies tensors into this model: no load hooks, and no
    module that loads its state its own way (torch's own modules' overrides only upgrade old
    checkpoint formats)."""
    for module in model.modules():
        if module._load_state_dict_pre_hooks or module._load_state_dict_post_hooks:
            return False
        loader = type(module)._load_from_state_dict
        if loader is not torch.nn.Module._load_from_state_dict and not loader.__module__.startswith(
            "torch."
        ):
            return False
    return True
