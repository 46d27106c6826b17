"""Client settings (TOML keys, FEDLINK_* variables and CLI flags share these names)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from fedlink.common.errors import ConfigError
from fedlink.common.logs import check_log_format

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]{1,3})?")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ClientConfig:
    server: str = field(default="127.0.0.1:50051", metadata=_help("coordinator host:port"))
    server_name: str | None = field(
        default=None,
        metadata=_help(
            "expected name in the server certificate, when it differs from the host in --server"
        ),
    )
    cert: Path | None = field(default=None, metadata=_help("this client's certificate (PEM)"))
    key: Path | None = field(default=None, metadata=_help("this client's private key (PEM)"))
    ca: Path | None = field(default=None, metadata=_help("federation CA certificate"))
    insecure: bool = field(
        default=False, metadata=_help("DEVELOPMENT ONLY: plaintext, no authentication")
    )
    task: str = field(default="digits", metadata=_help("task module; must match the coordinator's"))
    data_dir: Path | None = field(
        default=None, metadata=_help("this site's own data (overrides partitioning)")
    )
    partition: str = field(
        default="iid",
        metadata=_help(
            "simulation split of the task's data set: iid, dirichlet:<alpha>, classes:<k>"
        ),
    )
    partition_index: int = field(
        default=0, metadata=_help("which part of the split this client holds")
    )
    num_partitions: int = field(
        default=1, metadata=_help("how many parts the data set is split into")
    )
    seed: int = field(
        default=0, metadata=_help("partition seed (must be the same on every client)")
    )
    device: str = field(
        default="auto",
        metadata=_help("auto (CUDA when available), cpu, cuda, or cuda:N for the N-th GPU"),
    )
    threads: int = field(
        default=0,
        metadata=_help(
            "torch CPU threads; 0: OMP_NUM_THREADS when set, else the CPUs this process may use "
            "(affinity and cgroup quota)"
        ),
    )
    reconnect_timeout_seconds: float = field(
        default=300.0,
        metadata=_help("give up after the coordinator has been unreachable this long"),
    )
    reconnect_max_delay_seconds: float = field(
        default=30.0, metadata=_help("longest wait between two reconnection attempts")
    )
    spool_dir: Path | None = field(
        default=None,
        metadata=_help(
            "where a downloaded model is buffered when it cannot be written straight into the "
            "model (a GPU model, SCAFFOLD, load hooks; default: system temp dir), in a file with "
            "no name, gone when the client exits, however it exits"
        ),
    )
    simulate_attack: str | None = field(
        default=None,
        metadata=_help(
            "EVALUATION ONLY: send malicious updates (sign-flip, scaling, gaussian, label-flip, "
            "alie; see docs/aggregation.md)"
        ),
    )
    log_format: str = field(default="text", metadata=_help("log lines on stderr: text or json"))
    # This site's privacy floor (docs/privacy.md): what it refuses from any coordinator.
    secagg_min_clients: int = field(
        default=0,
        metadata=_help(
            "refuse secure-aggregation sessions with fewer clients (0: no floor); any floor set "
            "also refuses training without secure aggregation"
        ),
    )
    secagg_min_threshold: int = field(
        default=0,
        metadata=_help(
            "refuse secure-aggregation sessions whose sums may cover fewer clients (0: no floor)"
        ),
    )
    dp_min_noise_multiplier: float = field(
        default=0.0,
        metadata=_help(
            "refuse secure-aggregation sessions without DP or with a smaller noise multiplier "
            "(0: no floor)"
        ),
    )
    state_dir: Path | None = field(
        default=None,
        metadata=_help(
            "where this client keeps what must outlive a restart: the secure-aggregation "
            "sessions it signed, so secagg_max_attempts_per_round holds across restarts (unset: "
            "in memory only)"
        ),
    )
    secagg_max_attempts_per_round: int = field(
        default=1,
        metadata=_help(
            "sessions of one round (or one global model) in which this client signs the "
            "survivor set, at most; more let a coordinator subtract two sums"
        ),
    )

    def __post_init__(self) -> None:
        if not self.insecure and not (self.cert and self.key and self.ca):
            raise ConfigError(
                "TLS needs --cert, --key and --ca (your site's bundle from `fedlink certs issue "
                "--client`); --insecure exists for local development only"
            )
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(
                f"device must be auto, cpu, cuda or cuda:N (N = 0, 1, ...), got {self.device!r}"
            )
        if self.threads < 0:
            raise ConfigError(f"threads must be 0 (automatic) or positive, got {self.threads}")
        if self.num_partitions < 1 or not 0 <= self.partition_index < self.num_partitions:
            raise ConfigError(
                f"partition_index must be in 0..{self.num_partitions - 1}, got {self.partition_index}"
            )
        for name in ("reconnect_timeout_seconds", "reconnect_max_delay_seconds"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ConfigError(f"{name} must be positive")
        check_log_format(self.log_format)
        for name in ("secagg_min_clients", "secagg_min_threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        if not self.dp_min_noise_multiplier >= 0:  # also refuses NaN
            raise ConfigError("dp_min_noise_multiplier must be >= 0")
        if self.secagg_max_attempts_per_round < 1:
            raise ConfigError("secagg_max_attempts_per_round must be >= 1")
