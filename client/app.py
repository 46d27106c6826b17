"""`fedlink client`: join the federation, then pull tasks and push results until told to stop."""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import grpc
import torch

from fedlink import __version__
from fedlink.client.attacks import Attack, parse_attack
from fedlink.client.config import ClientConfig
from fedlink.client.connection import (
    TRANSIENT_CODES,
    Backoff,
    client_credentials,
    open_channel,
    trust_problem,
)
from fedlink.client.secure import (
    SECURE_STEPS,
    PrivacyFloor,
    SecureParticipant,
    encode_update,
    step_encodings,
)
from fedlink.common.accounting import PrivacyAccountant
from fedlink.common.codecs import UpdateCodec, codec_from_proto, compress_update
from fedlink.common.errors import (
    BelowPrivacyFloor,
    ConfigError,
    FedlinkError,
    PayloadError,
    SecAggError,
    TaskError,
    UpdateRejected,
)
from fedlink.common.partial import TensorSelection, frozen_digest
from fedlink.common.scaffold import (
    CONTROL_DELTA,
    SCAFFOLD,
    SERVER_CONTROL,
    control_correction,
    next_client_control,
    read_client_control,
    split_control,
)
from fedlink.common.secagg_wire import setup_from_proto
from fedlink.common.task_settings import (
    MAX_PROXIMAL_MU,
    NO_SETTINGS,
    PROXIMAL_MU,
    TaskSettings,
    TaskSettingsError,
    settings_from_proto,
    split_settings,
)
from fedlink.common.tasks import load_task
from fedlink.common.tasks.base import (
    OPTIMIZERS,
    ClientData,
    ControlCorrection,
    DataRequest,
    DPSGDConfig,
    TaskModule,
    TrainConfig,
    TrainResult,
)
from fedlink.common.tasks.contract import evaluate
from fedlink.common.tasks.training import check_dpsgd_model
from fedlink.common.tensors import (
    StateDict,
    first_difference,
    manifest_digest,
    manifest_entries,
    manifest_of,
    open_state_file,
    save_state_file,
)
from fedlink.common.threads import size_torch_threads
from fedlink.common.wire import (
    ENCODING,
    JOIN_REQUIRED,
    SESSION_METADATA_KEY,
    ByteSink,
    PayloadAssembler,
    PayloadFile,
    PayloadInfo,
)
from fedlink.v1 import federation_pb2 as pb
from fedlink.v1 import federation_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# A downloaded global model larger than this is refused (a hostile coordinator could otherwise
# fill the client's disk).
MAX_MODEL_BYTES = 64 << 30
# Secure aggregation's step messages (roster, share bundles, unmasking request) are small: a few
# hundred bytes per client of the session.
MAX_MESSAGE_BYTES = 64 << 20
# Leave is a courtesy on the way out: never hold the exit up for long, nor send a whole traceback.
LEAVE_TIMEOUT_SECONDS = 5.0
LEAVE_REASON_CHARS = 500


class FatalClientError(FedlinkError):
    """The federation refuses this client, or the client cannot take part: do not retry."""


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


def train_config_from(
    task_config: Mapping[str, str], seed: int, settings: TaskSettings = NO_SETTINGS
) -> TrainConfig:
    """The coordinator's hyper-parameters (and the task's and strategy's `settings`, already
    checked), checked: a hostile coordinator gets a clear error."""
    task_settings, own = split_settings(settings)
    if unknown := sorted(set(own) - {PROXIMAL_MU, SCAFFOLD}):
        raise FatalClientError(
            f"the coordinator sends settings this client does not know ({', '.join(unknown)}); "
            "its strategy needs a newer fedlink on this client"
        )
    proximal_mu = own.get(PROXIMAL_MU, 0.0)
    if (
        isinstance(proximal_mu, bool)
        or not isinstance(proximal_mu, int | float)
        or not 0 <= proximal_mu <= MAX_PROXIMAL_MU
    ):
        raise FatalClientError(
            f"coordinator sent an out-of-range FedProx mu {proximal_mu!r} (0 to {MAX_PROXIMAL_MU:g})"
        )
    try:
        dpsgd = None
        if "dpsgd_noise_multiplier" in task_config:  # record-level DP-SGD; DPSGDConfig checks
            dpsgd = DPSGDConfig(
                noise_multiplier=float(task_config["dpsgd_noise_multiplier"]),
                max_grad_norm=float(task_config.get("dpsgd_max_grad_norm", "1.0")),
                delta=float(task_config.get("dpsgd_delta", "1e-5")),
            )
        config = TrainConfig(
            local_epochs=int(task_config.get("local_epochs", "1")),
            batch_size=int(task_config.get("batch_size", "32")),
            learning_rate=float(task_config.get("learning_rate", "0.01")),
            momentum=float(task_config.get("momentum", "0.9")),
            weight_decay=float(task_config.get("weight_decay", "0.0")),
            optimizer=task_config.get("optimizer", "sgd"),
            seed=seed,
            dpsgd=dpsgd,
            task_config=task_settings,
            proximal_mu=float(proximal_mu),
        )
    except ValueError as exc:
        raise FatalClientError(f"coordinator sent malformed training settings: {exc}") from None
    if not (1 <= config.local_epochs <= 10_000 and 1 <= config.batch_size <= 1 << 20):
        raise FatalClientError(f"coordinator sent out-of-range training settings: {config}")
    if not (0 < config.learning_rate <= 100 and 0 <= config.momentum < 1):
        raise FatalClientError(f"coordinator sent out-of-range training settings: {config}")
    if not all(math.isfinite(v) for v in (config.learning_rate, config.momentum)):
        raise FatalClientError("coordinator sent non-finite training settings")
    if not 0 <= config.weight_decay <= 1 or config.optimizer not in OPTIMIZERS:
        raise FatalClientError(
            f"coordinator sent out-of-range training settings: weight_decay "
            f"{config.weight_decay} (0 to 1), optimizer {config.optimizer!r} "
            f"({', '.join(OPTIMIZERS)})"
        )
    if runs_scaffold(settings) and (
        config.optimizer != "sgd" or config.momentum != 0 or config.dpsgd is not None
    ):
        raise FatalClientError(
            "the coordinator runs SCAFFOLD with optimizer "
            f"{config.optimizer!r}, momentum {config.momentum:g}"
            f"{' and DP-SGD' if config.dpsgd else ''}; SCAFFOLD needs plain SGD steps"
        )
    return config


def runs_scaffold(settings: TaskSettings) -> bool:
    """Whether the coordinator's settings say the federation runs SCAFFOLD (checked)."""
    value = settings.get(SCAFFOLD, False)
    if not isinstance(value, bool):
        raise FatalClientError(f"coordinator sent {SCAFFOLD} = {value!r}; it must be a boolean")
    return value


def task_settings_from(header: pb.TaskHeader) -> TaskSettings:
    """The task's settings a header carries, checked (plain bounded values, never code)."""
    try:
        return settings_from_proto(header.task_config)
    except TaskSettingsError as exc:
        raise FatalClientError(f"coordinator sent invalid task settings: {exc}") from None


class FederationClient:
    def __init__(self, config: ClientConfig, channel: grpc.Channel | None = None) -> None:
        """`channel` replaces the one `config` would open (server/inprocess.py: the
        coordinator's services called in the same process, for tests and simulation)."""
        self._config = config
        self._task: TaskModule = load_task(config.task)
        self._device = pick_device(config.device)
        self._threads = size_torch_threads(config.threads)
        self._data: ClientData = self._task.load_data(
            DataRequest(
                partition=config.partition,
                partition_index=config.partition_index,
                num_partitions=config.num_partitions,
                seed=config.seed,
                data_dir=config.data_dir,
            )
        )
        self._model = self._task.build_model().to(self._device)
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
        self._credentials = client_credentials(config)
        self._channel = channel if channel is not None else open_channel(config, self._credentials)
        self._stub = pb_grpc.FederationStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = ()
        self._join: pb.JoinReply | None = None
        self._backoff = Backoff(
            maximum=config.reconnect_max_delay_seconds,
            give_up_after=config.reconnect_timeout_seconds,
        )
        self._stop_heartbeat = threading.Event()
        # A call in progress (a long poll, a download, an upload) shows the coordinator that
        # this client is alive: no heartbeats meanwhile. A coordinator too busy to take up an
        # upload would not take up a heartbeat either, and at 10,000 clients heartbeats sent
        # during uploads outnumbered every other call (benchmarks/load.py).
        self._in_call = threading.Event()
        self._secure: SecureParticipant | None = None
        self._floor = PrivacyFloor(
            min_clients=config.secagg_min_clients,
            min_threshold=config.secagg_min_threshold,
            min_noise_multiplier=config.dp_min_noise_multiplier,
            max_attempts_per_round=config.secagg_max_attempts_per_round,
        )
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

    def run(self) -> int:
        log.info(
            "client running task %s on %s (%d CPU threads)",
            self._config.task,
            self._device,
            self._threads,
        )
        if self._attack is not None:
            log.warning(
                "SIMULATED ATTACK %r: this client sends malicious updates (evaluation only)",
                self._config.simulate_attack,
            )
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat")
        try:
            if self._connect():
                heartbeat.start()
                self._serve()
            return 0
        except BaseException as exc:
            # Whatever ends this client (a signal, a refusal, the task's own exception), the
            # coordinator hears it now instead of waiting out the liveness timeout.
            self._leave(_leave_reason(exc))
            raise
        finally:
            self._stop_heartbeat.set()
            if heartbeat.is_alive():
                heartbeat.join()  # never close the channel under an in-flight call
            self._channel.close()

    def _serve(self) -> None:
        """Carry out tasks until the federation is over."""
        while True:
            try:
                if not self._serve_one_task():
                    log.info("federation finished; exiting")
                    return
                self._backoff.reset()
            except grpc.RpcError as exc:
                code = exc.code()
                if exc.details() == JOIN_REQUIRED:  # the coordinator restarted and forgot us
                    if not self._connect():
                        return
                elif code in TRANSIENT_CODES:
                    if not self._backoff.wait(f"{code.name}: {exc.details()}"):
                        raise FatalClientError("coordinator unreachable for too long") from None
                else:
                    raise FatalClientError(
                        f"the coordinator ended the session: {code.name}: {exc.details()}"
                    ) from None

    def _leave(self, reason: str) -> None:
        """Tell the coordinator this client is going (best effort: it may be unreachable)."""
        if not self._metadata:
            return  # never joined
        try:
            self._stub.Leave(
                pb.LeaveRequest(reason=reason[:LEAVE_REASON_CHARS]),
                metadata=self._metadata,
                timeout=LEAVE_TIMEOUT_SECONDS,
            )
        except grpc.RpcError as exc:
            log.debug("could not tell the coordinator this client leaves: %s", exc.code().name)

    def _connect(self) -> bool:
        """Join the federation; False when the coordinator says its run is already complete."""
        while True:
            try:
                reply, call = self._stub.Join.with_call(
                    pb.JoinRequest(client_version=__version__), timeout=30
                )
                break
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise FatalClientError(
                        f"the coordinator refused this client: {exc.details()}"
                    ) from None
                if code == grpc.StatusCode.UNAVAILABLE:
                    # A certificate the bundle cannot trust never fixes itself: do not retry.
                    problem = trust_problem(self._config)
                    if problem is not None:
                        raise FatalClientError(problem) from None
                if code not in TRANSIENT_CODES or not self._backoff.wait(
                    f"{code.name}: {exc.details()}"
                ):
                    raise FatalClientError(
                        f"could not join the federation: {code.name}: {exc.details()}"
                    ) from None
        for key, value in call.trailing_metadata() or ():
            if key == SESSION_METADATA_KEY:
                self._metadata = ((SESSION_METADATA_KEY, str(value)),)
        if reply.task != self._config.task:
            raise FatalClientError(
                f"the coordinator runs task {reply.task!r} but this client is configured for "
                f"{self._config.task!r}; start the client with --task {reply.task}"
            )
        # Settings are checked at once, and a model DP-SGD cannot train is refused before round 1.
        if train_config_from(reply.task_config, seed=0).dpsgd is not None:
            try:
                check_dpsgd_model(self._model)
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
        self._selection.freeze(self._model)  # what the federation does not exchange never trains
        self._restore_local_tensors(reply.identity)
        if reply.finished:
            log.info("federation %s is finished; exiting", reply.federation_id[:8])
            return False
        self._join = reply
        if self._secure is None or reply.identity != self._secure.identity:
            signed = None
            if self._config.state_dir is not None:
                signed = self._config.state_dir / f"secagg-signed-{reply.identity}.json"
            self._secure = SecureParticipant(reply.identity, self._credentials, self._floor, signed)
        self._backoff.reset()
        log.info("joined federation %s as %s", reply.federation_id[:8], reply.identity)
        return True

    def _check_model(self, reply: pb.JoinReply) -> None:
        """Refuse to take part with a model other than the coordinator's (names, dtypes,
        shapes), naming the first tensor that differs, before any round is started."""
        if not reply.model_manifest_sha256:
            return  # a coordinator that sends no fingerprint: checked at the first download
        ours = manifest_entries(manifest_of(self._travelling()))
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

    def _travelling(self) -> StateDict:
        """The tensors of this client's model that the federation exchanges."""
        return self._selection.travelling(self._model.state_dict())

    def _travelling_copy(self) -> StateDict:
        """A copy of the travelling tensors (the global model, before local training)."""
        return {name: tensor.detach().clone() for name, tensor in self._travelling().items()}

    def _check_frozen(self, reply: pb.JoinReply) -> None:
        """Refuse to take part when the frozen tensors (loaded by this site's task from its own
        files) are not the ones the coordinator's model has."""
        ours = frozen_digest(self._selection.frozen(self._model.state_dict()))
        if ours == reply.frozen_sha256:
            return
        theirs = reply.frozen_sha256.hex() or "nothing (no frozen tensors)"
        raise FatalClientError(
            f"this site's frozen tensors (those the federation does not exchange) hash to SHA-256 "
            f"{ours.hex() or 'nothing (no frozen tensors)'} but the coordinator's to {theirs}: "
            f"load the same pretrained weights as the coordinator in task {self._config.task!r}"
        )

    def _local_tensors_file(self, identity: str) -> Path | None:
        if self._config.state_dir is None or not self._selection.local:
            return None
        return self._config.state_dir / f"local-tensors-{identity}.safetensors"

    def _restore_local_tensors(self, identity: str) -> None:
        """Tensors that never leave this site (FedBN's batch norms), as the last round left them."""
        stored = self._local_tensors_file(identity)
        if stored is None or not stored.exists():
            return
        expected = manifest_of(self._selection.local_part(self._model.state_dict()))
        with open_state_file(stored) as local:
            if manifest_of(local) != expected:
                log.warning("%s does not fit this model's local tensors; not restored", stored)
                return
            self._model.load_state_dict(local, strict=False)
        log.info("restored %d local tensor(s) from %s", len(expected), stored)

    def _serve_one_task(self) -> bool:
        """Pull one task and carry it out; False when the federation is over."""
        # A waiting poll shows the coordinator this client is alive: no heartbeats meanwhile
        # (10,000 idle clients would otherwise send 1,000 heartbeats a second).
        with self._calling():
            stream = self._stub.PullTask(pb.PullTaskRequest(), metadata=self._metadata)
            first = next(stream, None)
        if first is None or first.WhichOneof("message") != "header":
            raise FatalClientError("coordinator sent a task stream without a header")
        header = first.header
        if header.kind == pb.TASK_KIND_STOP:
            return False
        if header.kind == pb.TASK_KIND_WAIT:
            if header.retry_after_seconds > 0:
                self._stop_heartbeat.wait(min(header.retry_after_seconds, 60.0))
            return True
        if header.kind in SECURE_STEPS:
            self._secure_step(header, stream)
            return True
        if header.kind not in (pb.TASK_KIND_TRAIN, pb.TASK_KIND_EVALUATE):
            raise FatalClientError(f"coordinator sent unknown task kind {header.kind}")
        if header.kind == pb.TASK_KIND_TRAIN and self._floor.requires_secure_aggregation:
            raise FatalClientError(
                "the coordinator asks for an update without secure aggregation, which it could "
                "read; this site's privacy floor (secagg_min_*, dp_min_noise_multiplier) requires it"
            )
        scaffold = header.kind == pb.TASK_KIND_TRAIN and runs_scaffold(task_settings_from(header))
        self._load_global_model(header, stream, with_control=scaffold)
        if header.kind == pb.TASK_KIND_TRAIN:
            self._train(header, scaffold)
        else:
            self._evaluate(header)
        return True

    def _receive(
        self,
        header: pb.TaskHeader,
        stream: Iterator[pb.TaskMessage],
        sink: ByteSink,
        *,
        encoding: str,
        max_size: int,
    ) -> None:
        """The task's payload chunks into `sink`, checked against the announced size and digest."""
        info = PayloadInfo(header.payload.size, header.payload.sha256, header.payload.encoding)
        with self._calling():
            try:
                assembler = PayloadAssembler(info, sink, max_size=max_size, encoding=encoding)
                for message in stream:
                    if message.WhichOneof("message") != "chunk":
                        raise PayloadError("unexpected second header in task stream")
                    assembler.add(message.chunk.offset, message.chunk.data)
                assembler.finish()
            except PayloadError as exc:
                raise FatalClientError(f"task download failed: {exc}") from None

    def _load_global_model(
        self,
        header: pb.TaskHeader,
        stream: Iterator[pb.TaskMessage],
        *,
        with_control: bool = False,
    ) -> None:
        """Load the downloaded global model; `with_control` (SCAFFOLD's training tasks): the
        download also carries the server's control variate c, which is kept for training."""
        with tempfile.NamedTemporaryFile(
            dir=self._config.spool_dir, suffix=".safetensors"
        ) as spool:
            self._receive(header, stream, spool, encoding=ENCODING, max_size=MAX_MODEL_BYTES)
            spool.flush()
            with open_state_file(Path(spool.name)) as state:
                model, control = (
                    split_control(state, SERVER_CONTROL) if with_control else (state, {})
                )
                travelling = self._travelling()
                if model.keys() != travelling.keys():
                    raise FatalClientError(
                        "the coordinator sent a model with other tensors than the federation "
                        "exchanges (its manifest at join)"
                    )
                if with_control:
                    self._server_control = _checked_control(control, travelling)
                # Only the travelling tensors: local and frozen ones stay as they are.
                self._model.load_state_dict(model, strict=not self._selection.partial)

    def _train_locally(
        self, header: pb.TaskHeader, control: ControlCorrection | None = None
    ) -> tuple[TrainResult, dict[str, float], TrainConfig]:
        """Train the loaded global model on the local data (with SCAFFOLD's `control`
        correction); the result, the metrics a plaintext result reports (the loss and, with
        DP-SGD, the epsilon spent so far) and the settings it trained with."""
        assert self._join is not None
        config = train_config_from(
            self._join.task_config, seed=header.seed, settings=task_settings_from(header)
        )
        config = dataclasses.replace(config, scaffold=control)
        torch.manual_seed(header.seed)
        if self._attack is None:
            result = self._task.train(self._model, self._data, config, self._device)
        else:
            log.warning(
                "round %d: SIMULATED %s ATTACK: poisoning this update",
                header.round,
                self._attack.name,
            )
            result = self._attack.train(self._task, self._model, self._data, config, self._device)
        log.info(
            "round %d: trained on %d examples, loss %.4f%s",
            header.round,
            result.num_examples,
            result.loss,
            f" (FedProx proximal term mu={config.proximal_mu:g})" if config.proximal_mu else "",
        )
        local = self._local_tensors_file(self._join.identity)
        if local is not None:  # kept for a restart: they exist nowhere else
            save_state_file(self._selection.local_part(self._model.state_dict()), local)
        metrics = {"loss": result.loss}
        if config.dpsgd is not None:
            metrics["dpsgd_epsilon"] = self._account_dpsgd(header.round, config.dpsgd, result)
        return result, metrics, config

    def _train(self, header: pb.TaskHeader, scaffold: bool = False) -> None:
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
        global_state = {} if codec.plain and not scaffold else self._travelling_copy()
        control = self._control_correction() if scaffold else None
        result, metrics, config = self._train_locally(header, control)
        extra: StateDict = {}
        client_control: StateDict = {}
        if control is not None:
            client_control, delta = self._next_control(header, control, global_state, config)
            extra = {CONTROL_DELTA + name: tensor for name, tensor in delta.items()}
        # Serialized to disk and streamed from there: no second in-memory copy of the model.
        with tempfile.TemporaryDirectory(dir=self._config.spool_dir) as spool:
            path = Path(spool) / "update.safetensors"
            if codec.plain:
                save_state_file({**self._travelling(), **extra}, path, durable=False)
            else:
                try:
                    self._encode_update(codec, global_state, path)
                except UpdateRejected as exc:
                    # Declined: the coordinator refuses a result without payload at once.
                    log.error("round %d: cannot encode this update: %s", header.round, exc)
                    self._push(header, result.num_examples, metrics, None)
                    return
            payload = PayloadFile.seal(path, codec.encoding)
            log.info(
                "round %d: uploading update (%.3f MB, %s)",
                header.round,
                payload.info.size / 1e6,
                codec.describe(),
            )
            taken = self._push(header, result.num_examples, metrics, payload)
        if control is not None and taken:
            # c_i moves only when the coordinator took Delta c_i: c stays the mean of the c_i.
            self._keep_client_control(client_control)

    def _control_correction(self) -> ControlCorrection:
        """SCAFFOLD's c - c_i for the parameters this client trains (by state_dict name)."""
        client = self._load_client_control()
        return control_correction(self._model, self._server_control, client)

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
                trained=self._travelling(),
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

    def _control_file(self) -> Path | None:
        if self._config.state_dir is None or self._join is None:
            return None
        return self._config.state_dir / f"scaffold-control-{self._join.identity}.safetensors"

    def _load_client_control(self) -> StateDict:
        """c_i: as the last round left it, from memory or --state-dir; zeros at first (and,
        with a warning, when what is stored does not fit the coordinator's c)."""
        expected = manifest_of(self._server_control)
        if self._client_control is not None and manifest_of(self._client_control) == expected:
            return self._client_control
        stored = self._control_file()
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

    def _keep_client_control(self, control: StateDict) -> None:
        self._client_control = control
        stored = self._control_file()
        if stored is not None:
            save_state_file(control, stored)

    def _encode_update(self, codec: UpdateCodec, global_state: StateDict, path: Path) -> None:
        """Write the trained model's change from `global_state` in `codec` to `path`; with top-k,
        what was not sent is kept (in --state-dir as safetensors, if set) for the next update."""
        if codec.topk and self._residual is None:
            self._residual = {}
            stored = self._residual_file()
            if stored is not None and stored.exists():
                with open_state_file(stored) as residual:
                    self._residual = {name: t.clone() for name, t in residual.items()}
        payload, kept = compress_update(
            codec,
            self._travelling(),
            global_state,
            self._residual or {},
        )
        save_state_file(payload, path, durable=False)
        if codec.topk:
            self._residual = kept
            stored = self._residual_file()
            if stored is not None:
                save_state_file(kept, stored)

    def _residual_file(self) -> Path | None:
        if self._config.state_dir is None or self._join is None:
            return None
        return self._config.state_dir / f"update-residual-{self._join.identity}.safetensors"

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

    def _secure_step(self, header: pb.TaskHeader, stream: Iterator[pb.TaskMessage]) -> None:
        """One step of a secure-aggregation round. The answer carries no sample count and no
        metrics: the weight is inside the encoded update, and the coordinator learns only sums.
        A step this client cannot or will not take is declined (a result without payload), so
        the coordinator need not wait for it."""
        assert self._secure is not None
        step = pb.TaskKind.Name(header.kind).removeprefix("TASK_KIND_").lower()
        try:
            setup = setup_from_proto(header.secagg)
            expected, answer_encoding = step_encodings(header.kind, setup)
            if header.kind == pb.TASK_KIND_SECAGG_ADVERTISE:
                self._load_global_model(header, stream)
                answer = self._secure.given_answer(header.kind, setup)
                # The global model and the training seed make an update reproducible: a second
                # masked input for the same pair could be subtracted from the first.
                model_digest = header.payload.sha256 + header.seed.to_bytes(8, "big")
                if answer is None:
                    # Before training: a refused session costs no work.
                    self._secure.admit(setup, header.round, model_digest)
                    # Only DP encodes the change from the global model; otherwise skip the copy.
                    global_state = self._travelling_copy() if setup.clip_norm > 0 else {}
                    # Metrics are not sent under secure aggregation (DP-SGD's epsilon is logged).
                    result, _, _ = self._train_locally(header)
                    vector = encode_update(
                        setup, self._travelling(), global_state, result.num_examples
                    )
                    if setup.clip_norm > 0:
                        # What this client actually did: z = std sqrt(t) / S for any sum of t.
                        log.info(
                            "round %d: DP: change clipped to norm %g, Gaussian noise of std "
                            "%.4g added before masking (noise multiplier %.4g for a sum of %d)",
                            header.round,
                            setup.clip_norm,
                            setup.noise_std,
                            setup.noise_std * math.sqrt(setup.params.threshold) / setup.clip_norm,
                            setup.params.threshold,
                        )
                    answer = self._secure.advertise(setup, vector, header.round, model_digest)
            else:
                message = io.BytesIO()
                self._receive(
                    header, stream, message, encoding=expected, max_size=MAX_MESSAGE_BYTES
                )
                answer = self._secure.respond(header.kind, setup, message.getvalue())
        except BelowPrivacyFloor as exc:
            log.error("round %d: refusing %s: %s", header.round, step, exc)
            raise FatalClientError(f"below this site's privacy floor: {exc}") from None
        except SecAggError as exc:
            log.warning("round %d: declining %s: %s", header.round, step, exc)
            self._push(header, 0, {}, None)
            return
        with tempfile.TemporaryDirectory(dir=self._config.spool_dir) as spool:
            path = Path(spool) / "answer"
            path.write_bytes(answer)
            log.info("round %d: %s (%d bytes)", header.round, step, len(answer))
            self._push(header, 0, {}, PayloadFile.seal(path, answer_encoding))

    def _evaluate(self, header: pb.TaskHeader) -> None:
        dataset = self._data.test if self._data.test is not None else self._data.train
        task_settings, _ = split_settings(task_settings_from(header))
        result = evaluate(self._task, self._model, dataset, self._device, task_settings)
        self._push(header, result.num_examples, result.metrics, None)

    def _push(
        self,
        header: pb.TaskHeader,
        num_examples: int,
        metrics: Mapping[str, float],
        payload: PayloadFile | None,
    ) -> bool:
        """Send a result; True when the coordinator took it, False when it refused it."""
        assert self._join is not None
        chunk_size = self._join.chunk_size

        def messages() -> Iterator[pb.ResultMessage]:
            result = pb.ResultHeader(
                task_id=header.task_id,
                round=header.round,
                num_examples=num_examples,
                metrics=metrics,
            )
            if payload is not None:
                info = payload.info
                result.payload.CopyFrom(
                    pb.PayloadInfo(size=info.size, sha256=info.sha256, encoding=info.encoding)
                )
            yield pb.ResultMessage(header=result)
            if payload is not None:
                for offset, data in payload.chunks(chunk_size):
                    yield pb.ResultMessage(chunk=pb.Chunk(offset=offset, data=data))

        while True:
            try:
                with self._calling():
                    self._stub.PushResult(messages(), metadata=self._metadata)
                return True
            except grpc.RpcError as exc:
                code = exc.code()
                # The coordinator is over a limit or its disk is full: keep the result and send
                # it again after a pause, rather than pulling and training the task once more.
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED and self._backoff.wait(
                    f"{code.name}: {exc.details()}"
                ):
                    continue
                if code in TRANSIENT_CODES:
                    raise
                # A refused result costs this round only; the next task may still be ours.
                log.warning(
                    "round %d result refused: %s: %s", header.round, code.name, exc.details()
                )
                return False

    @contextmanager
    def _calling(self) -> Iterator[None]:
        """A call to the coordinator in progress: no heartbeats until it ends."""
        self._in_call.set()
        try:
            yield
        finally:
            self._in_call.clear()

    def _heartbeat_loop(self) -> None:
        assert self._join is not None
        interval = max(0.5, self._join.heartbeat_interval_seconds)
        while not self._stop_heartbeat.wait(interval):
            if self._in_call.is_set():
                continue
            try:
                self._stub.Heartbeat(
                    pb.HeartbeatRequest(), metadata=self._metadata, timeout=interval
                )
            except grpc.RpcError as exc:
                log.debug("heartbeat failed: %s", exc.code().name)


def _checked_control(control: Mapping[str, torch.Tensor], travelling: StateDict) -> StateDict:
    """The server's control variate c from a download, checked against the model (one finite
    floating tensor of the same shape per floating travelling tensor) and copied out of it."""
    expected = {name for name, t in travelling.items() if t.dtype.is_floating_point}
    if control.keys() != expected:
        raise FatalClientError(
            "the coordinator sent SCAFFOLD control variates for other tensors than the "
            "model's floating ones"
        )
    for name, c in control.items():
        if (
            not c.dtype.is_floating_point
            or c.shape != travelling[name].shape
            or not bool(torch.isfinite(c).all())
        ):
            raise FatalClientError(
                f"the coordinator sent a SCAFFOLD control variate for {name!r} that does not fit "
                f"the model (dtype {c.dtype}, shape {tuple(c.shape)}) or is not finite"
            )
    return {name: c.clone() for name, c in control.items()}


def _leave_reason(exc: BaseException) -> str:
    """What the coordinator is told when this client stops with `exc`."""
    if _Signals.received is not None:
        return f"received {_Signals.received}"
    if isinstance(exc, FedlinkError):
        return str(exc)
    return f"the task failed: {type(exc).__name__}: {exc}"


class ShutdownRequested(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT, wherever it is (polling, training, uploading).

    A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows
    it. The task in hand is abandoned: the coordinator hands it to this client again if it comes
    back while the round is open, or closes the round without it once it is silent.
    """


class _Signals:
    """The shutdown signal received, if any. Kept beside the exception because a library can
    catch it on the way and re-raise its own error instead (safetensors, its header check
    interrupted, reports "not a valid safetensors payload"): the shutdown still wins."""

    received: str | None = None


def _raise_shutdown(signum: int, frame: FrameType | None) -> None:
    _Signals.received = signal.Signals(signum).name
    raise ShutdownRequested(_Signals.received)


def run_client(config: ClientConfig) -> int:
    _Signals.received = None
    previous = {sig: signal.signal(sig, _raise_shutdown) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return FederationClient(config).run()
    except BaseException as exc:
        # The signal's exception can reach here re-wrapped by whatever it interrupted: a
        # library's own error (safetensors), or a RuntimeError from a class being defined
        # (torch imports torch._dynamo lazily at the first optimizer). Once a shutdown signal
        # has arrived, whatever unwinds the client is that shutdown.
        if _Signals.received is not None:
            log.info("received %s: left the federation", _Signals.received)
            return 0
        if isinstance(exc, FatalClientError):
            log.error("%s", exc)
            return 2
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
