"""Coordinator settings (TOML keys, FEDLINK_* variables and CLI flags share these names)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlink.common.codecs import DEFAULT_BLOCK_SIZE, UpdateCodec
from fedlink.common.errors import ConfigError, PKIError
from fedlink.common.fixedpoint import RING_BITS
from fedlink.common.logs import check_log_format
from fedlink.common.partial import TensorSelection
from fedlink.common.pki import validate_name
from fedlink.common.task_settings import (
    NO_SETTINGS,
    SettingValue,
    TaskSettings,
    TaskSettingsError,
    check_task_settings,
    merge_settings,
)
from fedlink.common.tasks.base import OPTIMIZERS
from fedlink.common.wire import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from fedlink.server.robust import AggregationRule, FedAvg, parse_rule
from fedlink.server.strategy import Composition, Strategy
from fedlink.server.strategy_config import build_strategy


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ServerConfig:
    listen: str = field(
        default="0.0.0.0:50051", metadata=_help("host:port to listen on (port 0 = any free port)")
    )
    cert: Path | None = field(default=None, metadata=_help("server certificate (PEM)"))
    key: Path | None = field(default=None, metadata=_help("server private key (PEM)"))
    ca: Path | None = field(
        default=None,
        metadata=_help("federation CA certificate; clients must present a certificate it signed"),
    )
    insecure: bool = field(
        default=False, metadata=_help("DEVELOPMENT ONLY: plaintext, unauthenticated clients")
    )
    task: str = field(
        default="digits", metadata=_help("task module: a built-in name or package.module")
    )
    num_rounds: int = field(default=10, metadata=_help("training rounds to run"))
    min_clients: int = field(
        default=2, metadata=_help("clients that must be connected before round 1 starts")
    )
    fraction_fit: float = field(
        default=1.0, metadata=_help("fraction of connected clients sampled per round")
    )
    min_fit_clients: int = field(default=2, metadata=_help("never sample fewer clients than this"))
    min_results: int = field(
        default=1, metadata=_help("quorum: accepted updates needed for a round to count")
    )
    aggregation: str = field(
        default="fedavg",
        metadata=_help(
            "aggregation rule: fedavg, median, trimmed-mean,beta=B, krum,f=F, multi-krum,f=F[,m=M], "
            "each optionally with ,clip=<norm> or ,clip=median (see docs/aggregation.md)"
        ),
    )
    strategy: str = field(
        default="fedavg",
        metadata=_help(
            "how results become the next global model: fedavg, fedavgm, fedadam, fedyogi, "
            'fedadagrad, fedprox, scaffold, or your own Strategy subclass as "package.module:Class" '
            "(see docs/strategies.md)"
        ),
    )
    strategy_params: Mapping[str, Any] | None = field(
        default=None,
        metadata=_help(
            "the strategy's parameters: the TOML table [strategy_params], or the inside of an "
            "inline table as a flag or variable (e.g. 'eta = 0.01, beta1 = 0.9')"
        ),
    )
    below_quorum: str = field(
        default="retry",
        metadata=_help(
            "retry: at the deadline, repeat the round with a new sample of live clients; "
            "wait: keep the round open until its sampled clients deliver the quorum"
        ),
    )
    max_round_retries: int = field(
        default=3, metadata=_help("consecutive failed rounds before the run is abandoned")
    )
    round_timeout_seconds: float = field(
        default=600.0, metadata=_help("deadline for collecting a round's results")
    )
    liveness_timeout_seconds: float = field(
        default=30.0,
        metadata=_help("a client silent this long (no heartbeat, poll or upload) counts as gone"),
    )
    finished_grace_seconds: float = field(
        default=60.0,
        metadata=_help(
            "after the run is complete, keep telling clients so for up to this long, until every "
            "live client and every known one not yet seen again has heard it"
        ),
    )
    evaluate_every: int = field(
        default=1, metadata=_help("federated evaluation every N rounds (0 = only centralized)")
    )
    local_epochs: int = field(default=1, metadata=_help("local epochs per round (sent to clients)"))
    batch_size: int = field(default=32, metadata=_help("local batch size (sent to clients)"))
    learning_rate: float = field(
        default=0.01, metadata=_help("local learning rate (sent to clients)")
    )
    momentum: float = field(
        default=0.9, metadata=_help("local SGD momentum (sent to clients; sgd only)")
    )
    weight_decay: float = field(
        default=0.0, metadata=_help("local L2 weight decay (sent to clients)")
    )
    optimizer: str = field(
        default="sgd", metadata=_help("local optimizer: sgd, adam or adamw (sent to clients)")
    )
    task_config: Mapping[str, SettingValue] = field(
        default_factory=lambda: NO_SETTINGS,
        metadata=_help(
            "task-specific settings sent to the task's train and evaluate on every client: a "
            "TOML table of strings, integers, numbers and booleans (docs/tasks.md)"
        ),
    )
    test_data_dir: Path | None = field(
        default=None,
        metadata=_help(
            "where the coordinator's centralized test set is read from (the task's "
            "load_test_data(data_dir)); unset = the task's default source"
        ),
    )
    max_update_norm_ratio: float = field(
        default=100.0,
        metadata=_help(
            "refuse an update farther than this many times |global model| (L2, at least 1) from "
            "the global model; 0 = no bound (the aggregate is still kept finite)"
        ),
    )
    max_num_examples: int = field(
        default=10_000_000,
        metadata=_help("cap on a client's reported sample count (its aggregation weight)"),
    )
    chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE, metadata=_help("payload chunk size in bytes")
    )
    heartbeat_interval_seconds: float = field(
        default=10.0, metadata=_help("how often clients send heartbeats")
    )
    seed: int = field(
        default=0,
        metadata=_help(
            "seed for the initial model, client sampling and each client's local training"
        ),
    )
    run_dir: Path = field(
        default=Path("fedlink-run"),
        metadata=_help("where metrics.jsonl, the final model and the plot are written"),
    )
    state_dir: Path = field(
        default=Path("fedlink-state"),
        metadata=_help(
            "checkpoints, global models and spooled uploads; a restart on it resumes the run "
            "(in containers: a volume)"
        ),
    )
    keep_checkpoints: int = field(
        default=3, metadata=_help("completed-round checkpoints kept in the state directory")
    )
    address_file: Path | None = field(
        default=None, metadata=_help("write the bound host:port here once listening")
    )
    max_workers: int = field(
        default=0,
        metadata=_help(
            "threads that hash, spool and validate results (waiting clients hold none); 0: the "
            "CPUs this process may use"
        ),
    )
    metrics_listen: str | None = field(
        default=None,
        metadata=_help("host:port for the Prometheus metrics endpoint (plain HTTP; unset = off)"),
    )
    dashboard_listen: str | None = field(
        default=None,
        metadata=_help(
            "host:port of the read-only live dashboard (HTTPS with the server certificate, "
            "token required; unset = off)"
        ),
    )
    dashboard_token_file: Path | None = field(
        default=None,
        metadata=_help(
            "file holding the dashboard's access token; unset = state_dir/dashboard-token, "
            "created (0600) when missing"
        ),
    )
    log_format: str = field(default="text", metadata=_help("log lines on stderr: text or json"))
    threads: int = field(
        default=0,
        metadata=_help(
            "torch CPU threads for aggregation and evaluation; 0: OMP_NUM_THREADS when set, else "
            "the CPUs this process may use (affinity and cgroup quota)"
        ),
    )
    tensorboard: bool = field(
        default=True,
        metadata=_help(
            "write TensorBoard event files of every round's metrics to run_dir/tensorboard"
        ),
    )
    client_rows: bool = field(
        default=True,
        metadata=_help(
            "write run_dir/clients.jsonl: one row per client per round (sampled, result and "
            "why, examples, bytes, upload time, its metrics); never under secure aggregation"
        ),
    )
    client_rows_max_mb: int = field(
        default=64,
        metadata=_help(
            "clients.jsonl is rotated to clients.jsonl.1 (replacing it) before it passes this size"
        ),
    )
    mlflow_tracking_uri: str | None = field(
        default=None,
        metadata=_help(
            "log the settings and every round's metrics to this MLflow tracking server (needs "
            "the mlflow extra; unset = off)"
        ),
    )
    mlflow_experiment: str = field(
        default="fedlink", metadata=_help("MLflow experiment the run is logged under")
    )
    # Access control and resource limits (docs/security.md).
    allowed_clients: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "client identities (certificate names) allowed to join; empty = any the CA signed"
        ),
    )
    revocation_list: Path | None = field(
        default=None,
        metadata=_help("CRL from `fedlink certs revoke` (crl.pem); reloaded when the file changes"),
    )
    rate_limit_per_second: float = field(
        default=50.0, metadata=_help("calls per second each client may make on average")
    )
    rate_limit_burst: int = field(
        default=100, metadata=_help("calls a client may make at once before the rate applies")
    )
    max_calls_per_client: int = field(
        default=8, metadata=_help("calls one client may have in progress at the same time")
    )
    max_concurrent_rpcs: int = field(
        default=2048, metadata=_help("calls in progress or queued across all clients")
    )
    max_health_watches_per_client: int = field(
        default=4, metadata=_help("health Watch streams one allowed identity may hold open")
    )
    max_health_watches: int = field(
        default=256, metadata=_help("health Watch streams open across all identities")
    )
    max_connections: int = field(
        default=1024,
        metadata=_help(
            "TCP connections, handshaking or established, from all sources; beyond it a new "
            "one is closed at once"
        ),
    )
    handshake_timeout_seconds: float = field(
        default=10.0, metadata=_help("a connection whose TLS handshake takes longer is closed")
    )
    max_connection_idle_seconds: float = field(
        default=300.0,
        metadata=_help("a connection without a call in progress this long is closed"),
    )
    # Client-level differential privacy (DP-FedAvg, docs/privacy.md): on when dp_clip_norm is set.
    dp_clip_norm: float | None = field(
        default=None,
        metadata=_help(
            "client-level DP-FedAvg: clip each update's change to this L2 norm S, average with "
            "uniform weights and add N(0, (z S)^2) to the sum (unset = off)"
        ),
    )
    dp_noise_multiplier: float = field(
        default=1.0, metadata=_help("DP noise multiplier z: noise std z * dp_clip_norm on the sum")
    )
    dp_delta: float = field(default=1e-5, metadata=_help("DP delta the epsilon is reported at"))
    dp_max_epsilon: float | None = field(
        default=None,
        metadata=_help("DP budget: stop before the round that would take epsilon past this"),
    )
    # Record-level DP-SGD in each client's local training (docs/privacy.md): on when
    # dpsgd_noise_multiplier is set.
    dpsgd_noise_multiplier: float | None = field(
        default=None,
        metadata=_help(
            "record-level DP-SGD on the clients: clip each example's gradient to "
            "dpsgd_max_grad_norm C and add N(0, (z C)^2) to each batch's sum, z being this "
            "(unset = off)"
        ),
    )
    dpsgd_max_grad_norm: float = field(
        default=1.0, metadata=_help("DP-SGD: L2 norm C each example's gradient is clipped to")
    )
    dpsgd_delta: float = field(
        default=1e-5, metadata=_help("DP-SGD: delta the clients report their epsilon at")
    )

    # Partial models (docs/large-models.md): which tensors travel, stay local or are frozen.
    exchanged_tensors: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "only the model's tensors whose names match these patterns (fnmatch, e.g. "
            "'*lora_*') are exchanged and aggregated; the others that are not local are frozen, "
            "loaded by each site itself and checked by hash at join; empty = the task's "
            "EXCHANGED_TENSORS, else every tensor"
        ),
    )
    local_tensors: tuple[str, ...] = field(
        default=(),
        metadata=_help(
            "tensors whose names match these patterns never leave a site and are never "
            "aggregated (FedBN: the batch-norm layers, e.g. 'bn*')"
        ),
    )
    frozen_sha256: str | None = field(
        default=None,
        metadata=_help(
            "expected SHA-256 (hex) of the frozen tensors; the coordinator refuses to start "
            "when its own differ (unset: its own model's, logged at start-up, is what clients "
            "must match)"
        ),
    )
    # Update compression (docs/large-models.md): how clients encode their training results.
    update_codec: str = field(
        default="fp32",
        metadata=_help(
            "how clients send updates: fp32 (the model as it is), or its change from the global "
            "model as fp16, bf16 or int8 (with scales); decoded before any check or aggregation"
        ),
    )
    update_int8_block_size: int = field(
        default=DEFAULT_BLOCK_SIZE,
        metadata=_help("int8 updates: entries sharing one scale; 0 = one scale per tensor"),
    )
    update_topk: float = field(
        default=0.0,
        metadata=_help(
            "send only this fraction of each tensor's entries, the largest changes (0 < f <= "
            "0.5; 0 = all); each client keeps the rest and adds it to its next update"
        ),
    )

    # Secure aggregation (docs/privacy.md): the coordinator learns only the sum of the updates.
    secure_aggregation: bool = field(
        default=False,
        metadata=_help(
            "secure aggregation (Bonawitz et al. 2017): clients send masked, fixed-point updates "
            "and the coordinator recovers only their sum; needs aggregation = fedavg"
        ),
    )
    secagg_ring_bits: int = field(
        default=64,
        metadata=_help("secure aggregation's ring Z_2^k: 64, or 32 to halve the upload"),
    )
    secagg_value_bound: float = field(
        default=100.0,
        metadata=_help(
            "secure aggregation: bound on every model weight's magnitude; a client whose model "
            "exceeds it declines the round (with DP the bound is derived from dp_clip_norm)"
        ),
    )
    secagg_max_weight: float | None = field(
        default=None,
        metadata=_help(
            "secure aggregation: the weight cap W (a client with more examples counts as W); "
            "unset = max_num_examples"
        ),
    )
    secagg_neighbours: int = field(
        default=0,
        metadata=_help(
            "SecAgg+: each client shares keys and masks with only this many neighbours (even, "
            ">= 2), on a random ring; 0 = every other client (the complete graph)"
        ),
    )
    secagg_step_timeout_seconds: float = field(
        default=60.0,
        metadata=_help(
            "deadline of each secure-aggregation step after training (keys, masked input, unmask)"
        ),
    )

    def __post_init__(self) -> None:
        self._check_transport()
        positive = {
            "num_rounds": self.num_rounds,
            "min_clients": self.min_clients,
            "min_fit_clients": self.min_fit_clients,
            "min_results": self.min_results,
            "local_epochs": self.local_epochs,
            "batch_size": self.batch_size,
            "max_num_examples": self.max_num_examples,
            "rate_limit_burst": self.rate_limit_burst,
            "max_calls_per_client": self.max_calls_per_client,
            "max_concurrent_rpcs": self.max_concurrent_rpcs,
            "max_health_watches_per_client": self.max_health_watches_per_client,
            "max_health_watches": self.max_health_watches,
            "max_connections": self.max_connections,
            "keep_checkpoints": self.keep_checkpoints,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if not 0.0 < self.fraction_fit <= 1.0:
            raise ConfigError(f"fraction_fit must be in (0, 1], got {self.fraction_fit}")
        if self.min_results > self.min_fit_clients:
            raise ConfigError("min_results cannot exceed min_fit_clients")
        # Written as "not > 0" so that NaN is refused too.
        if not (self.round_timeout_seconds > 0 and self.heartbeat_interval_seconds > 0):
            raise ConfigError("timeouts and intervals must be positive")
        if not (math.isfinite(self.finished_grace_seconds) and self.finished_grace_seconds >= 0):
            raise ConfigError(
                f"finished_grace_seconds must be a finite number >= 0, got "
                f"{self.finished_grace_seconds}"
            )
        if not self.liveness_timeout_seconds >= 2 * self.heartbeat_interval_seconds:
            raise ConfigError(
                "liveness_timeout_seconds must be at least twice heartbeat_interval_seconds, or "
                "one late heartbeat would drop a healthy client"
            )
        if not (math.isfinite(self.max_update_norm_ratio) and self.max_update_norm_ratio >= 0):
            raise ConfigError(
                "max_update_norm_ratio must be a finite number >= 0 (0 turns the bound off), got "
                f"{self.max_update_norm_ratio}"
            )
        if self.below_quorum not in ("retry", "wait"):
            raise ConfigError(f"below_quorum must be retry or wait, got {self.below_quorum!r}")
        check_log_format(self.log_format)
        for name, value in (("threads", self.threads), ("max_workers", self.max_workers)):
            if value < 0:
                raise ConfigError(f"{name} must be 0 (automatic) or positive, got {value}")
        rule = parse_rule(self.aggregation)
        if self.min_results < rule.min_updates:
            raise ConfigError(
                f"aggregation {self.aggregation!r} needs at least {rule.min_updates} updates per "
                f"round; set min_results (and min_fit_clients) to at least {rule.min_updates}"
            )
        if not self.learning_rate > 0 or not 0.0 <= self.momentum < 1.0:
            raise ConfigError("learning_rate must be > 0 and momentum in [0, 1)")
        if not (math.isfinite(self.weight_decay) and 0.0 <= self.weight_decay <= 1.0):
            raise ConfigError(f"weight_decay must be in [0, 1], got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        try:
            # Frozen: the checked, read-only copy replaces what the TOML gave.
            object.__setattr__(self, "task_config", check_task_settings(self.task_config))
        except TaskSettingsError as exc:
            raise ConfigError(str(exc)) from None
        if self.client_rows_max_mb < 1:
            raise ConfigError(
                f"client_rows_max_mb must be at least 1, got {self.client_rows_max_mb}"
            )
        if self.evaluate_every < 0 or self.max_round_retries < 0:
            raise ConfigError("evaluate_every and max_round_retries must be >= 0")
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise ConfigError(f"chunk_size must be in {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}")
        self._check_access()
        self._check_privacy(rule)
        self._check_secure_aggregation(rule)
        self._check_update_codec()
        self.tensor_selection()
        if self.frozen_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", self.frozen_sha256):
            raise ConfigError(
                f"frozen_sha256 must be 64 lowercase hex digits (a SHA-256), got "
                f"{self.frozen_sha256[:80]!r}"
            )
        self._check_dpsgd()
        # Refuses a strategy that cannot be loaded or does not compose, and settings of its
        # that clash with task_config.
        self.task_settings(self.build_strategy())

    def build_strategy(self) -> Strategy:
        """The strategy these settings name, over their aggregation rule and DP."""
        dp = None if self.dp_clip_norm is None else (self.dp_noise_multiplier, self.dp_clip_norm)
        codec = self.update_codec_spec()
        return build_strategy(
            self.strategy,
            self.strategy_params,
            aggregation=self.aggregation,
            dp=dp,
            secure_aggregation=self.secure_aggregation,
            composition=Composition(
                dpsgd=self.dpsgd_noise_multiplier is not None,
                update_codec="" if codec.plain else codec.describe(),
                optimizer=self.optimizer,
                momentum=self.momentum,
            ),
        )

    def task_settings(self, strategy: Strategy) -> TaskSettings:
        """What every task header carries: `task_config` and `strategy`'s client settings."""
        try:
            return merge_settings(self.task_config, strategy.client_settings())
        except TaskSettingsError as exc:
            raise ConfigError(f"strategy {self.strategy!r}: {exc}") from None

    def _check_transport(self) -> None:
        """Certificates for the listener (a simulation has none: it overrides this)."""
        if not self.insecure and not (self.cert and self.key and self.ca):
            raise ConfigError(
                "TLS needs --cert, --key and --ca (create them with `fedlink certs init` and "
                "`fedlink certs issue --server`); --insecure exists for local development only"
            )
        if self.dashboard_listen is not None and self.insecure:
            raise ConfigError(
                "the dashboard is served over TLS with the server certificate; --insecure has "
                "none. Unset dashboard_listen, or run with certificates"
            )

    def _check_access(self) -> None:
        for name in ("handshake_timeout_seconds", "max_connection_idle_seconds"):
            seconds = getattr(self, name)
            # Written as "not >= 0.001" so that NaN is refused too; gRPC takes milliseconds.
            if not (math.isfinite(seconds) and seconds >= 0.001):
                raise ConfigError(f"{name} must be a positive number of seconds, got {seconds}")
        if not (self.rate_limit_per_second > 0 and math.isfinite(self.rate_limit_per_second)):
            raise ConfigError(
                f"rate_limit_per_second must be a positive number, got {self.rate_limit_per_second}"
            )
        if self.insecure and (self.allowed_clients or self.revocation_list is not None):
            raise ConfigError(
                "allowed_clients and revocation_list need certificates; they cannot be used "
                "with --insecure"
            )
        for name in self.allowed_clients:
            try:
                validate_name(name)
            except PKIError as exc:
                raise ConfigError(f"allowed_clients: {exc}") from None

    def _check_privacy(self, rule: AggregationRule) -> None:
        if self.dp_clip_norm is None:
            if self.dp_max_epsilon is not None:
                raise ConfigError(
                    "dp_max_epsilon needs differential privacy: set dp_clip_norm (and "
                    "dp_noise_multiplier) as well"
                )
            return
        # Written as "not > 0" so that NaN is refused too.
        if not (math.isfinite(self.dp_clip_norm) and self.dp_clip_norm > 0):
            raise ConfigError(f"dp_clip_norm must be positive and finite, got {self.dp_clip_norm}")
        if not (math.isfinite(self.dp_noise_multiplier) and self.dp_noise_multiplier > 0):
            raise ConfigError(
                f"dp_noise_multiplier must be positive and finite, got {self.dp_noise_multiplier} "
                "(without noise there is no privacy guarantee: unset dp_clip_norm instead)"
            )
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")
        if self.dp_max_epsilon is not None and not self.dp_max_epsilon > 0:
            raise ConfigError(f"dp_max_epsilon must be positive, got {self.dp_max_epsilon}")
        if type(rule) is not FedAvg:
            raise ConfigError(
                f"differential privacy averages clipped updates (DP-FedAvg), so it needs "
                f'aggregation = "fedavg", got {self.aggregation!r}: the noise is calibrated to '
                "a mean, not to a median or Krum"
            )

    def _check_secure_aggregation(self, rule: AggregationRule) -> None:
        if not self.secure_aggregation:
            return
        if type(rule) is not FedAvg:
            raise ConfigError(
                f"secure aggregation reveals only the sum of the updates, so it needs "
                f'aggregation = "fedavg", got {self.aggregation!r}: robust rules need every '
                "individual update"
            )
        if self.min_fit_clients < 3:
            raise ConfigError(
                "secure aggregation needs min_fit_clients >= 3: with two clients, each learns "
                "the other's update by subtracting its own from the sum"
            )
        if self.secagg_ring_bits not in RING_BITS:
            raise ConfigError(
                f"secagg_ring_bits must be one of {RING_BITS}, got {self.secagg_ring_bits}"
            )
        # Written as "not >= 1" so that NaN is refused too.
        if not (math.isfinite(self.secagg_value_bound) and self.secagg_value_bound >= 1):
            raise ConfigError(
                f"secagg_value_bound must be finite and >= 1 (the weight slot holds up to 1), "
                f"got {self.secagg_value_bound}"
            )
        weight = self.secagg_max_weight
        if weight is not None and not (math.isfinite(weight) and weight >= 1):
            raise ConfigError(f"secagg_max_weight must be finite and >= 1, got {weight}")
        k = self.secagg_neighbours
        if k < 0 or k % 2:
            raise ConfigError(
                f"secagg_neighbours must be 0 (every client is every other's neighbour) or an "
                f"even number >= 2, got {k}"
            )
        if not self.secagg_step_timeout_seconds > 0:
            raise ConfigError(
                f"secagg_step_timeout_seconds must be positive, got {self.secagg_step_timeout_seconds}"
            )

    def tensor_selection(self) -> TensorSelection:
        """Which tensors travel (checked: ConfigError)."""
        return TensorSelection(self.exchanged_tensors, self.local_tensors)

    def update_codec_spec(self) -> UpdateCodec:
        """The codec every training result must be encoded with (checked: ConfigError)."""
        return UpdateCodec(self.update_codec, self.update_int8_block_size, self.update_topk)

    def _check_update_codec(self) -> None:
        codec = self.update_codec_spec()
        if self.secure_aggregation and not codec.plain:
            raise ConfigError(
                f"update codec {codec.describe()!r} cannot be used with secure_aggregation: the "
                "coordinator decodes every update before aggregating it, and under secure "
                "aggregation it never sees one, only a masked fixed-point sum. Leave update_codec "
                "at fp32 and update_topk at 0 (secure aggregation's own upload halves with "
                "secagg_ring_bits = 32)"
            )

    def _check_dpsgd(self) -> None:
        if self.dpsgd_noise_multiplier is None:
            return
        # Written as "not > 0" so that NaN is refused too.
        if not (math.isfinite(self.dpsgd_noise_multiplier) and self.dpsgd_noise_multiplier > 0):
            raise ConfigError(
                f"dpsgd_noise_multiplier must be positive and finite, got "
                f"{self.dpsgd_noise_multiplier} (without noise there is no privacy guarantee: "
                "unset it instead)"
            )
        if not (math.isfinite(self.dpsgd_max_grad_norm) and self.dpsgd_max_grad_norm > 0):
            raise ConfigError(
                f"dpsgd_max_grad_norm must be positive and finite, got {self.dpsgd_max_grad_norm}"
            )
        if not 0 < self.dpsgd_delta < 1:
            raise ConfigError(f"dpsgd_delta must be in (0, 1), got {self.dpsgd_delta}")

    def hyperparameters(self) -> dict[str, str]:
        """The training hyper-parameters every client receives when it joins (the task's own
        settings, `task_config`, travel in every task header instead)."""
        config = {
            "local_epochs": str(self.local_epochs),
            "batch_size": str(self.batch_size),
            "learning_rate": repr(self.learning_rate),
            "momentum": repr(self.momentum),
            "weight_decay": repr(self.weight_decay),
            "optimizer": self.optimizer,
        }
        if self.dpsgd_noise_multiplier is not None:
            config.update(
                dpsgd_noise_multiplier=repr(self.dpsgd_noise_multiplier),
                dpsgd_max_grad_norm=repr(self.dpsgd_max_grad_norm),
                dpsgd_delta=repr(self.dpsgd_delta),
            )
        return config
