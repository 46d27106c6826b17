"""Simulation settings: every coordinator setting (server/config.py), plus the few that say how
many virtual clients there are and where their training runs.

A simulation's TOML file is a coordinator's with these keys added; every key means what it
means to `fedlink server` (the listener's keys, `listen`, `cert`, `key`, `ca`, are unused: no
socket is opened).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedlink.common.errors import ConfigError, TaskError
from fedlink.common.partition import parse_partition
from fedlink.server.config import ServerConfig

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("process", "ray")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


def client_name(index: int, num_clients: int) -> str:
    """Virtual client `index`'s identity: what a certificate's name is to a real coordinator
    (it seeds the client's training and orders aggregation), so a real federation whose sites
    carry these names is the same federation."""
    return f"client-{index:0{len(str(max(0, num_clients - 1)))}d}"


@dataclass(frozen=True)
class SimulationConfig(ServerConfig):
    backend: str = field(
        default="process",
        metadata=_help(
            "where the workers run: process (forked processes on this machine) or ray (Ray "
            "actors; needs the ray extra)"
        ),
    )
    ray_address: str | None = field(
        default=None,
        metadata=_help(
            'backend ray: the cluster to join ("auto", host:port or ray://host:port); unset: a '
            "Ray started for this simulation on this machine"
        ),
    )
    num_clients: int = field(
        default=10,
        metadata=_help(
            "virtual clients; client i trains on part i of the task's data split by partition"
        ),
    )
    partition: str = field(
        default="iid",
        metadata=_help("how the task's data is split: iid, dirichlet:<alpha>, classes:<k>"),
    )
    data_dir: Path | None = field(
        default=None,
        metadata=_help("the data the clients' parts are cut from (unset: the task's default)"),
    )
    workers: int = field(
        default=0,
        metadata=_help(
            "worker processes that run the clients' training, each reusing one model; 0: one "
            "per usable CPU, or workers_per_gpu per GPU when device is cuda"
        ),
    )
    worker_threads: int = field(
        default=1, metadata=_help("torch CPU threads of each worker process")
    )
    device: str = field(
        default="auto",
        metadata=_help(
            "where workers train: cpu, cuda (workers pinned to cuda:0, cuda:1, ... in turn), or "
            "auto (cuda when available)"
        ),
    )
    workers_per_gpu: int = field(
        default=1,
        metadata=_help(
            "workers sharing one GPU: at most GPU memory / one client's peak memory "
            "(docs/simulation.md)"
        ),
    )

    def _check_transport(self) -> None:
        """No listener and no certificates: nothing leaves the process."""
        if self.dashboard_listen is not None or self.metrics_listen is not None:
            raise ConfigError(
                "a simulation serves no dashboard or metrics endpoint; unset dashboard_listen "
                "and metrics_listen (every round is in metrics.jsonl and TensorBoard)"
            )

    def __post_init__(self) -> None:
        super().__post_init__()
        needed = max(self.min_clients, self.min_fit_clients, self.min_results)
        if self.num_clients < needed:
            raise ConfigError(
                f"num_clients {self.num_clients} is below min_clients / min_fit_clients / "
                f"min_results ({needed}): the first round would never start"
            )
        if self.workers < 0 or self.worker_threads < 1 or self.workers_per_gpu < 1:
            raise ConfigError(
                "workers must be >= 0 (0: automatic), worker_threads and workers_per_gpu >= 1"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        try:
            parse_partition(self.partition)
        except TaskError as exc:
            raise ConfigError(str(exc)) from None
        if not self.update_codec_spec().plain or self.tensor_selection().partial:
            raise ConfigError(
                "update codecs and partial models (exchanged_tensors, local_tensors) are not "
                "simulated yet: unset them, or run the federation with `fedlink server`"
            )
        if self.secure_aggregation:
            raise ConfigError(
                "secure aggregation is not simulated (its point is what the coordinator cannot "
                "see over the network); simulate without it, rehearse it with `fedlink demo`"
            )
        if self.build_strategy().extra_tensors and self.backend == "ray":
            raise ConfigError(
                f"strategy {self.strategy!r}'s virtual clients keep state between rounds "
                "(SCAFFOLD's control variates) in the state directory, which Ray workers on "
                'other machines cannot reach; simulate it with backend = "process"'
            )
        if self.dpsgd_noise_multiplier is not None:
            raise ConfigError(
                "record-level DP-SGD is not simulated yet (each client's privacy accountant "
                "lives in its process); unset dpsgd_noise_multiplier. Client-level DP "
                "(dp_clip_norm) is simulated"
            )
