"""`fedlink demo`: a real federation on this machine, the way it runs across sites.

Creates a CA and certificates, starts the coordinator and N client processes that talk gRPC over
mutual TLS on 127.0.0.1, shows progress, and leaves metrics.jsonl, the final model, an accuracy
plot and every process's log in the run directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from fedlink.common.pki import init_ca, issue_certificate
from fedlink.server.report import read_metrics, table_header, table_row

STARTUP_TIMEOUT_SECONDS = 120.0
SHUTDOWN_TIMEOUT_SECONDS = 60.0
# Lines of a failed client's log shown when the demo stops because of it.
DEAD_CLIENT_LOG_LINES = 15


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=5, help="client processes to start")
    parser.add_argument("--rounds", type=int, default=30, help="training rounds")
    parser.add_argument("--task", default="digits", help="task (built-in name or module)")
    parser.add_argument(
        "--partition",
        default="classes:2",
        help="how the data set is split: iid, dirichlet:<alpha>, classes:<k>",
    )
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="output directory (default: runs/demo-<timestamp>)",
    )
    parser.add_argument(
        "--min-accuracy",
        type=float,
        default=None,
        help="exit non-zero if the final test accuracy is below this",
    )


def run_demo(args: argparse.Namespace) -> int:
    if args.clients < 1 or args.rounds < 1:
        print("fedlink demo: --clients and --rounds must be at least 1", file=sys.stderr)
        return 2
    run_dir: Path = args.run_dir or Path("runs") / datetime.now().strftime("demo-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    logs.mkdir(exist_ok=True)
    certs = _make_certificates(run_dir / "certs", args.clients)
    print(
        f"fedlink demo: {args.clients} clients, {args.rounds} rounds, task {args.task}, "
        f"partition {args.partition}, mutual TLS; writing to {run_dir}",
        flush=True,
    )

    address_file = run_dir / "server.address"
    address_file.unlink(missing_ok=True)
    server = _spawn(
        [
            "server",
            "--listen",
            "127.0.0.1:0",
            "--address-file",
            str(address_file),
            "--cert",
            str(certs / "server" / "server.pem"),
            "--key",
            str(certs / "server" / "server.key"),
            "--ca",
            str(certs / "server" / "ca.pem"),
            "--task",
            args.task,
            "--num-rounds",
            str(args.rounds),
            "--min-clients",
            str(args.clients),
            "--min-fit-clients",
            str(args.clients),
            "--local-epochs",
            str(args.local_epochs),
            "--learning-rate",
            str(args.learning_rate),
            "--batch-size",
            str(args.batch_size),
            "--seed",
            str(args.seed),
            "--heartbeat-interval-seconds",
            "2",
            "--run-dir",
            str(run_dir),
            "--state-dir",
            str(run_dir / "state"),
        ],
        logs / "server.log",
    )
    clients: list[subprocess.Popen[bytes]] = []
    try:
        address = _wait_for_address(address_file, server)
        for index in range(args.clients):
            name = f"client-{index + 1}"
            bundle = certs / name
            clients.append(
                _spawn(
                    [
                        "client",
                        "--server",
                        address,
                        "--cert",
                        str(bundle / f"{name}.pem"),
                        "--key",
                        str(bundle / f"{name}.key"),
                        "--ca",
                        str(bundle / "ca.pem"),
                        "--task",
                        args.task,
                        "--partition",
                        args.partition,
                        "--partition-index",
                        str(index),
                        "--num-partitions",
                        str(args.clients),
                        "--seed",
                        str(args.seed),
                        "--device",
                        "auto",
                    ],
                    logs / f"{name}.log",
                )
            )
        died = _follow_progress(run_dir / "metrics.jsonl", args.rounds, server, clients)
        if died is not None:
            _report_dead_client(died + 1, clients[died].returncode, logs)
            return 1
        server_code = server.wait()
        client_codes = [_wait_or_kill(c) for c in clients]
    except KeyboardInterrupt:
        print("\ninterrupted: stopping the federation", file=sys.stderr)
        server_code = 130
        client_codes = []
    finally:
        for process in [server, *clients]:
            _wait_or_kill(
                process, timeout=0 if process.poll() is None else SHUTDOWN_TIMEOUT_SECONDS
            )
    return _report(run_dir, args, server_code, client_codes)


def _make_certificates(directory: Path, num_clients: int) -> Path:
    """A fresh CA and one bundle per participant (what each site would receive)."""
    ca_dir = directory / "ca"
    if not (ca_dir / "ca.pem").exists():
        init_ca(ca_dir)
    issue_certificate(
        ca_dir,
        directory / "server",
        "server",
        role="server",
        hosts=["localhost", "127.0.0.1"],
        force=True,
    )
    for index in range(num_clients):
        name = f"client-{index + 1}"
        issue_certificate(ca_dir, directory / name, name, role="client", force=True)
    return directory


def _spawn(arguments: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 (owned by the child process)
    # All processes share this machine's cores: one math thread each avoids oversubscription,
    # which makes small-batch training many times slower (threads spin waiting for each other).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedlink", *arguments], stdout=log, stderr=log, env=env
    )


def _wait_for_address(address_file: Path, server: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if address_file.exists() and address_file.read_text().strip():
            return address_file.read_text().strip()
        if server.poll() is not None:
            raise SystemExit(
                f"the coordinator exited with status {server.returncode} during start-up"
            )
        time.sleep(0.1)
    raise SystemExit("the coordinator did not start listening in time")


def _follow_progress(
    metrics: Path,
    rounds: int,
    server: subprocess.Popen[bytes],
    clients: list[subprocess.Popen[bytes]],
) -> int | None:
    """A progress bar (when on a terminal) plus one table row per finished round, until the
    coordinator exits; or the index of a client that failed first (every client is needed for
    every round, so the run could only wait for it forever)."""
    shown = 0
    with tqdm(total=rounds, unit="round", desc="training", disable=None, leave=False) as bar:
        tqdm.write(table_header())
        while True:
            records = _read_lines(metrics)
            for record in records[shown:]:
                tqdm.write(table_row(record))
                acc = record.get("test_accuracy")
                bar.set_postfix(accuracy=f"{acc:.3f}" if acc is not None else "-")
                bar.update(1)
            shown = len(records)
            if server.poll() is not None:
                return None
            for index, client in enumerate(clients):
                if client.poll() not in (None, 0):  # 0: told to stop as the run ends
                    return index
            time.sleep(0.2)


def _report_dead_client(number: int, code: int | None, logs: Path) -> None:
    log_path = logs / f"client-{number}.log"
    tail = log_path.read_text(errors="replace").splitlines()[-DEAD_CLIENT_LOG_LINES:]
    print(
        f"fedlink demo: client-{number} exited with status {code} before the run finished; "
        f"stopping the federation. The end of {log_path}:",
        *(f"  {line}" for line in tail),
        sep="\n",
        file=sys.stderr,
    )


def _read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line still being written
    return records


def _wait_or_kill(
    process: subprocess.Popen[bytes], timeout: float = SHUTDOWN_TIMEOUT_SECONDS
) -> int:
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        try:
            return process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def _report(
    run_dir: Path, args: argparse.Namespace, server_code: int, client_codes: list[int]
) -> int:
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.exists() else []
    print()
    final = records[-1]["test_accuracy"] if records else None
    failed = (
        server_code != 0 or any(code != 0 for code in client_codes) or len(records) < args.rounds
    )
    print()
    if final is not None:
        print(f"final test accuracy: {final:.4f} after {len(records)} rounds")
    print(
        f"run directory: {run_dir}  (metrics.jsonl, final_model.safetensors, accuracy.png, logs/)"
    )
    if failed:
        print(
            f"demo FAILED: coordinator exit {server_code}, client exits {client_codes}; "
            f"see {run_dir / 'logs'}",
            file=sys.stderr,
        )
        return 1
    if args.min_accuracy is not None and (final is None or final < args.min_accuracy):
        print(
            f"demo FAILED: final accuracy {final} is below --min-accuracy {args.min_accuracy}",
            file=sys.stderr,
        )
        return 1
    return 0
