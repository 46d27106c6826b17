"""Flood benchmark: what callers that take part in nothing can hold of a real coordinator.

    .venv/bin/python benchmarks/floods.py                      # 640 Watch streams, 2,400 sockets
    .venv/bin/python benchmarks/floods.py --watches 1000 --connections 4000 --window 20

Starts `fedlink server` (a digits task whose local training takes 1 s longer, so a round lasts
about as long as a real one; an allow-list of two sites) and two `fedlink client` processes, then
measures the coordinator in five windows: quiet; while a CA-signed certificate off the
allow-list holds health Watch streams; after they end; while TCP connections that never start a
TLS handshake are held open; after they close. Per window: the coordinator's threads, open file
descriptors, resident memory (least and most), the median seconds of the rounds completed in it,
and how long an honest health Check takes. Writes JSON (default benchmarks/results/floods.json).
The machine's load matters: run `uptime` alongside.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedlink.common.pki import init_ca, issue_certificate

BENCH_DIR = Path(__file__).resolve().parent
TASKS_DIR = BENCH_DIR.parent / "tests" / "e2e" / "tasks"
DEFAULT_OUT = BENCH_DIR / "results" / "floods.json"
SITES = ("site-a", "site-b")


def channel(certs: Path, name: str, address: str) -> grpc.Channel:
    bundle = certs / name
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(bundle / "ca.pem").read_bytes(),
        private_key=(bundle / f"{name}.key").read_bytes(),
        certificate_chain=(bundle / f"{name}.pem").read_bytes(),
    )
    return grpc.secure_channel(address, credentials)


def start(work: Path) -> tuple[subprocess.Popen[bytes], list[subprocess.Popen[bytes]], str]:
    certs = work / "certs"
    init_ca(certs / "ca")
    issue_certificate(certs / "ca", certs / "server", "server", role="server", hosts=["127.0.0.1"])
    for name in (*SITES, "stranger", "healthcheck"):
        issue_certificate(certs / "ca", certs / name, name, role="client")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TASKS_DIR), os.environ.get("PYTHONPATH", "")]),
        "SLOW_TRAIN_SECONDS": "1",
        "OMP_NUM_THREADS": "1",
    }
    fedlink = [sys.executable, "-m", "fedlink"]
    server_bundle = certs / "server"
    server = subprocess.Popen(
        [
            *fedlink,
            "server",
            f"--cert={server_bundle / 'server.pem'}",
            f"--key={server_bundle / 'server.key'}",
            f"--ca={server_bundle / 'ca.pem'}",
            "--listen=127.0.0.1:0",
            f"--address-file={work / 'address'}",
            "--task=slow_digits_task",
            "--num-rounds=100000",
            "--min-clients=2",
            "--min-fit-clients=2",
            "--evaluate-every=0",
            f"--allowed-clients={','.join(SITES)}",
            f"--run-dir={work / 'run'}",
            f"--state-dir={work / 'state'}",
        ],
        stdout=open(work / "server.log", "wb"),  # noqa: SIM115 (lives as long as the process)
        stderr=subprocess.STDOUT,
        env=env,
    )
    deadline = time.monotonic() + 120
    while not ((work / "address").exists() and (work / "address").read_text().strip()):
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the coordinator did not start; see {work / 'server.log'}")
        time.sleep(0.1)
    address = (work / "address").read_text().strip()
    clients = []
    for name in SITES:
        bundle = certs / name
        clients.append(
            subprocess.Popen(
                [
                    *fedlink,
                    "client",
                    f"--cert={bundle / f'{name}.pem'}",
                    f"--key={bundle / f'{name}.key'}",
                    f"--ca={bundle / 'ca.pem'}",
                    f"--server={address}",
                    "--task=slow_digits_task",
                ],
                stdout=open(work / f"{name}.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
    return server, clients, address


def proc(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return {
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "rss_mib": rss / 1024,
    }


def round_seconds(run_dir: Path) -> list[float]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return []
    return [json.loads(line)["seconds"] for line in metrics.read_text().splitlines()]


def timed_check(certs: Path, address: str) -> float | None:
    with channel(certs, "healthcheck", address) as probe:
        started = time.monotonic()
        try:
            health_pb2_grpc.HealthStub(probe).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return None
        return time.monotonic() - started


def window(
    name: str, pid: int, work: Path, address: str, seconds: float, during: Callable[[], None]
) -> dict[str, Any]:
    """Sample the coordinator for `seconds`; `during` runs once after the first second."""
    done_before = len(round_seconds(work / "run"))
    samples = [proc(pid)]
    started = time.monotonic()
    check: float | None = None
    while time.monotonic() - started < seconds:
        time.sleep(0.1)
        samples.append(proc(pid))
        if check is None and time.monotonic() - started > 1:
            during()
            check = timed_check(work / "certs", address) or -1.0
    rounds = round_seconds(work / "run")[done_before:]
    row = {
        "window": name,
        "threads": max(s["threads"] for s in samples),
        "fds": max(s["fds"] for s in samples),
        "rss_min_mib": min(s["rss_mib"] for s in samples),
        "rss_max_mib": max(s["rss_mib"] for s in samples),
        "rounds": len(rounds),
        "round_seconds": statistics.median(rounds) if rounds else None,
        "check_seconds": None if check is None or check < 0 else check,
    }
    print(format_row(row), flush=True)
    return row


def format_row(row: dict[str, Any]) -> str:
    rounds = "stalled" if row["round_seconds"] is None else f"{row['round_seconds']:.2f}"
    check = "timeout" if row["check_seconds"] is None else f"{row['check_seconds']:.3f}"
    return (
        f"{row['window']:<20} {row['threads']:>7} {row['fds']:>6} "
        f"{row['rss_min_mib']:>7.0f} {row['rss_max_mib']:>7.0f} {row['rounds']:>6} "
        f"{rounds:>8} {check:>8}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watches", type=int, default=640)
    parser.add_argument("--connections", type=int, default=2400)
    parser.add_argument("--window", type=float, default=15.0, help="seconds per window")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (min(hard, max(soft, args.connections + 1024)), hard)
    )
    with tempfile.TemporaryDirectory(prefix="fedlink-floods-") as tmp:
        work = Path(tmp)
        server, clients, address = start(work)
        streams: list[Any] = []
        channels: list[grpc.Channel] = []
        sockets: list[socket.socket] = []
        rows = []

        def watch_flood() -> None:
            channels.append(channel(work / "certs", "stranger", address))
            stub = health_pb2_grpc.HealthStub(channels[-1])
            streams.extend(stub.Watch(health_pb2.HealthCheckRequest()) for _ in range(args.watches))

        def end_watches() -> None:
            for stream in streams:
                stream.cancel()
            for stranger in channels:
                stranger.close()
            streams.clear()
            channels.clear()

        def connection_flood() -> None:
            host, port = address.rsplit(":", 1)
            for _ in range(args.connections):
                connection = socket.socket()
                connection.setblocking(False)
                connection.connect_ex((host, int(port)))
                sockets.append(connection)

        def end_connections() -> None:
            for connection in sockets:
                connection.close()
            sockets.clear()

        try:
            while len(round_seconds(work / "run")) < 2:
                time.sleep(0.2)
            print(f"{'window':<20} threads    fds  RSS lo  RSS hi rounds  round s  check s")
            pid, seconds = server.pid, args.window
            rows.append(window("quiet", pid, work, address, seconds, lambda: None))
            rows.append(window("watch flood", pid, work, address, seconds, watch_flood))
            rows.append(window("after watches", pid, work, address, seconds, end_watches))
            rows.append(window("connection flood", pid, work, address, seconds, connection_flood))
            rows.append(window("after connections", pid, work, address, seconds, end_connections))
        finally:
            end_watches()
            end_connections()
            for process in (server, *clients):
                process.kill()
                process.wait()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"watches": args.watches, "connections": args.connections, "rows": rows}, indent=2
        )
        + "\n"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
