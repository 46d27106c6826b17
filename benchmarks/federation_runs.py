"""Whole federations for the benchmarks that compare settings end to end (compression.py,
transfer.py): a coordinator and N clients with certificates of their own, run as `fedlink server`
and `fedlink client` processes over mutual TLS on 127.0.0.1, each client on one part of the data.
What comes back is the coordinator's own record of each round (metrics.jsonl)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from fedlink.common.pki import init_ca, issue_certificate


def client_name(index: int) -> str:
    return f"client-{index + 1}"


def issue_certificates(certs: Path, clients: int) -> None:
    """A CA, the coordinator's certificate (127.0.0.1) and one per client under `certs`."""
    init_ca(certs / "ca")
    issue_certificate(certs / "ca", certs / "server", "server", role="server", hosts=["127.0.0.1"])
    for index in range(clients):
        name = client_name(index)
        issue_certificate(certs / "ca", certs / name, name, role="client")


def process_env() -> dict[str, str]:
    """This environment with one torch thread per process: the clients share the cores."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_federation(
    certs: Path,
    run: Path,
    *,
    clients: int,
    server: Mapping[str, object],
    client: Mapping[str, object],
    env: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Run one federation to its end in `run` (logs, run and state directories): the coordinator
    with `server`'s settings, `clients` clients with `client`'s, client i on IID part i (its own
    state directory); the metrics.jsonl rows. SystemExit when the coordinator fails."""
    run.mkdir(parents=True)
    env = dict(process_env() if env is None else env)
    address_file = run / "address"
    coordinator = _spawn(
        [
            "server",
            *_flags(
                cert=certs / "server" / "server.pem",
                key=certs / "server" / "server.key",
                ca=certs / "server" / "ca.pem",
                listen="127.0.0.1:0",
                address_file=address_file,
                min_clients=clients,
                min_fit_clients=clients,
                heartbeat_interval_seconds=2,
                run_dir=run,
                state_dir=run / "state",
                **server,
            ),
        ],
        run / "server.log",
        env,
    )
    processes = [coordinator]
    try:
        while not (address_file.exists() and address_file.read_text().strip()):
            if coordinator.poll() is not None:
                raise SystemExit(f"coordinator exited; see {run / 'server.log'}")
            time.sleep(0.2)
        address = address_file.read_text().strip()
        for index in range(clients):
            name = client_name(index)
            bundle = certs / name
            flags = _flags(
                server=address,
                cert=bundle / f"{name}.pem",
                key=bundle / f"{name}.key",
                ca=bundle / "ca.pem",
                partition="iid",
                partition_index=index,
                device="cpu",
                state_dir=run / f"{name}-state",
                **client,
            )
            processes.append(_spawn(["client", *flags], run / f"{name}.log", env))
        if coordinator.wait() != 0:
            raise SystemExit(f"coordinator failed; see {run / 'server.log'}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _flags(**values: object) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]


def _spawn(arguments: list[str], log: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    out: IO[bytes] = open(log, "wb")  # noqa: SIM115 (owned by the child process)
    return subprocess.Popen(
        [sys.executable, "-m", "fedlink", *arguments], stdout=out, stderr=out, env=env
    )
