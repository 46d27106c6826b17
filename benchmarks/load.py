"""Load benchmark: one coordinator serving hundreds of concurrent clients over mutual TLS.

    .venv/bin/python benchmarks/load.py                        # 300 clients, 10 rounds
    .venv/bin/python benchmarks/load.py --clients 600 --workers 6
    .venv/bin/python benchmarks/load.py --clients 100 --workers 2 --rounds 4 --secure
    .venv/bin/python benchmarks/load.py --clients 100 --workers 2 --rounds 4 --secagg-neighbours 14

A real coordinator (`fedlink server`) runs the no-op task (benchmarks/noop_task.py) with its tiny
model, every client sampled every round, no federated evaluation. The clients are the real
client code, `fedlink.client.app.FederationClient`, each with its own certificate (identity),
channel, TLS connection and heartbeat thread; hundreds of client processes would not fit in
memory (each imports torch), so they run as threads in a few worker processes (this file's
`worker` command). All connect at once. `--secure` runs every round under secure aggregation
(every client masks against all others), `--secagg-neighbours K` under SecAgg+ with K neighbours.

Per round it prints the round time, clients sampled/accepted/rejected, and the coordinator's
resident memory, CPU time, threads and file descriptors (from /proc); at the end, every client's
exit status, any client errors and the coordinator's warnings. Writes JSON (default
benchmarks/results/load.json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soak import RoundCounter, proc_status
from transport import (
    BENCH_DIR,
    MIB,
    STARTUP_TIMEOUT_SECONDS,
    TASK,
    Processes,
    child_env,
    make_certificates,
    process_cpu,
    reap,
    results_header,
    save_results,
    terminate_on_sigterm,
    try_reap,
    wait_for_file,
)

DEFAULT_OUT = BENCH_DIR / "results" / "load.json"
MODELS = ("tiny", "cnn1.66m")
POLL_SECONDS = 0.02


# ---- the worker process: many FederationClients as threads ------------------------------------


def run_worker(args: argparse.Namespace) -> int:
    """Run clients args.first .. args.first + args.count - 1 as threads; print one JSON report."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(threadName)s %(message)s"
    )
    from fedlink.client.app import FederationClient
    from fedlink.client.config import ClientConfig

    outcomes: dict[str, str] = {}
    clients = []
    for index in range(args.first, args.first + args.count):
        name = f"client-{index}"
        bundle = args.certs / name
        spool = args.spool / name
        spool.mkdir(parents=True)
        config = ClientConfig(
            server=args.server,
            cert=bundle / f"{name}.pem",
            key=bundle / f"{name}.key",
            ca=bundle / "ca.pem",
            task=TASK,
            device="cpu",
            spool_dir=spool,
        )
        clients.append((name, FederationClient(config)))

    def serve(name: str, client: FederationClient) -> None:
        try:
            code = client.run()
            outcomes[name] = f"exit {code}"
        except Exception as exc:  # reported, not raised: one failure must not hide the others
            outcomes[name] = f"{type(exc).__name__}: {exc}"

    threads = [
        threading.Thread(target=serve, args=(name, client), name=name) for name, client in clients
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"outcomes": outcomes}), flush=True)
    return 0


# ---- the driver ----------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path, processes: Processes) -> dict[str, Any]:
    print(f"issuing {args.clients} client certificates ...", flush=True)
    make_certificates(work / "certs", args.clients)
    env = child_env(args.model)
    run_dir, logs = work / "run", work / "logs"
    logs.mkdir(parents=True)
    address_file = work / "server.address"
    server = processes.spawn(
        [
            sys.executable,
            "-m",
            "fedlink",
            "server",
            "--listen",
            "127.0.0.1:0",
            "--address-file",
            str(address_file),
            "--cert",
            str(work / "certs" / "server" / "server.pem"),
            "--key",
            str(work / "certs" / "server" / "server.key"),
            "--ca",
            str(work / "certs" / "server" / "ca.pem"),
            "--task",
            TASK,
            "--num-rounds",
            str(args.rounds),
            "--min-clients",
            str(args.clients),
            "--min-fit-clients",
            str(args.clients),
            "--evaluate-every",
            "0",
            "--round-timeout-seconds",
            str(args.round_timeout),
            "--run-dir",
            str(run_dir),
            "--state-dir",
            str(work / "state"),
            *secure_flags(args),
        ],
        logs / "server.log",
        env,
        work,
    )
    address = wait_for_file(address_file, server, STARTUP_TIMEOUT_SECONDS)
    per_worker = -(-args.clients // args.workers)
    workers = []
    started = time.monotonic()
    for w in range(args.workers):
        first = 1 + w * per_worker
        count = min(per_worker, args.clients - first + 1)
        if count <= 0:
            break
        workers.append(
            processes.spawn(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "worker",
                    "--server",
                    address,
                    "--certs",
                    str(work / "certs"),
                    "--spool",
                    str(work / "spool"),
                    "--first",
                    str(first),
                    "--count",
                    str(count),
                ],
                logs / f"worker-{w + 1}.log",
                env,
                work,
                pipes=True,
            )
        )
    print(
        f"{args.clients} clients in {len(workers)} worker processes connecting to {address}",
        flush=True,
    )
    counter = RoundCounter(run_dir / "metrics.jsonl")
    rows: list[dict[str, Any]] = []
    cpu_before = sum(process_cpu(server.pid))
    peak_threads = peak_fds = 0
    deadline = started + args.timeout
    print(HEADER, flush=True)
    print("-" * len(HEADER), flush=True)
    while (server_exit := try_reap(server)) is None:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{counter.rounds} of {args.rounds} rounds after {args.timeout:.0f}s"
            )
        try:
            status = proc_status(server.pid)
            fds = len(os.listdir(f"/proc/{server.pid}/fd"))
        except OSError:  # exiting
            time.sleep(POLL_SECONDS)
            continue
        peak_threads, peak_fds = max(peak_threads, status["threads"]), max(peak_fds, fds)
        if counter.poll() > len(rows):
            cpu = sum(process_cpu(server.pid))
            records = read_rows(run_dir / "metrics.jsonl")
            for record in records[len(rows) :]:
                row = {
                    "round": record["round"],
                    "seconds": record["seconds"],
                    "sampled": record["clients_sampled"],
                    "accepted": record["clients_accepted"],
                    "rejected": record["rejected"],
                    "rss_bytes": status["rss_bytes"],
                    # Since the previous row; for round 1, since the clients were started
                    # (TLS handshakes and joins included).
                    "cpu_seconds": cpu - cpu_before,
                    "threads": status["threads"],
                    "fds": fds,
                }
                if not rows:
                    row["joined_after_seconds"] = time.monotonic() - started - record["seconds"]
                rows.append(row)
                print(format_row(row), flush=True)
            cpu_before = cpu
        time.sleep(POLL_SECONDS)
    outcomes: dict[str, str] = {}
    for worker in workers:
        assert worker.stdout is not None
        output = worker.stdout.read()  # the worker's one line, once its clients have exited
        reap(worker, time.monotonic() + 60)
        for line in output.decode().splitlines():
            outcomes.update(json.loads(line)["outcomes"])
    server_log = (logs / "server.log").read_text(errors="replace").splitlines()
    warnings = [line for line in server_log if " WARNING " in line or " ERROR " in line]
    worker_warnings = sum(
        1
        for w in range(len(workers))
        for line in (logs / f"worker-{w + 1}.log").read_text(errors="replace").splitlines()
        if " WARNING " in line or " ERROR " in line
    )
    failed_clients = {name: o for name, o in outcomes.items() if o != "exit 0"}
    return {
        "rounds": rows,
        "server_exit": server_exit.returncode,
        "server_peak_rss_bytes": server_exit.peak_rss_bytes,
        "server_peak_threads": peak_threads,
        "server_peak_fds": peak_fds,
        "clients_reported": len(outcomes),
        "failed_clients": dict(sorted(failed_clients.items())[:20]),
        "failed_client_count": len(failed_clients),
        "server_warnings": warnings[:50],
        "server_warning_count": len(warnings),
        "worker_warning_count": worker_warnings,
        "wall_seconds": time.monotonic() - started,
        "passed": server_exit.returncode == 0
        and len(rows) == args.rounds
        and len(outcomes) == args.clients
        and not failed_clients
        and all(r["accepted"] == r["sampled"] == args.clients for r in rows),
    }


def secure_flags(args: argparse.Namespace) -> list[str]:
    """The coordinator's secure-aggregation options for this run (none: plaintext)."""
    if args.secagg_neighbours:
        return ["--secure-aggregation", "--secagg-neighbours", str(args.secagg_neighbours)]
    return ["--secure-aggregation"] if args.secure else []


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


HEADER = (
    f"{'round':>5} {'seconds':>8} {'sampled':>7} {'accepted':>8} {'rejected':>8} "
    f"{'srv RSS MiB':>11} {'srv CPU s':>9} {'threads':>7} {'fds':>5}"
)


def format_row(row: dict[str, Any]) -> str:
    return (
        f"{row['round']:>5} {row['seconds']:>8.2f} {row['sampled']:>7} {row['accepted']:>8} "
        f"{len(row['rejected']):>8} {row['rss_bytes'] / MIB:>11.1f} {row['cpu_seconds']:>9.2f} "
        f"{row['threads']:>7} {row['fds']:>5}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one coordinator, many concurrent mTLS clients")
    commands = parser.add_subparsers(dest="command")
    worker = commands.add_parser("worker", help="(internal) run clients as threads")
    worker.add_argument("--server", required=True)
    worker.add_argument("--certs", type=Path, required=True)
    worker.add_argument("--spool", type=Path, required=True)
    worker.add_argument("--first", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--round-timeout", type=float, default=300.0, help="seconds per round")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    parser.add_argument(
        "--secure", action="store_true", help="secure aggregation, complete graph (n - 1 peers)"
    )
    parser.add_argument(
        "--secagg-neighbours",
        type=int,
        default=0,
        metavar="K",
        help="secure aggregation with SecAgg+: K neighbours per client (even; implies --secure)",
    )
    args = parser.parse_args(argv)
    if args.secagg_neighbours and (args.secagg_neighbours < 2 or args.secagg_neighbours % 2):
        parser.error("--secagg-neighbours must be an even number >= 2")
    if args.command is None and not (1 <= args.workers <= args.clients and args.rounds >= 1):
        parser.error("need 1 <= workers <= clients and rounds >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "worker":
        return run_worker(args)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedlink-load-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    processes = Processes()
    result: dict[str, Any] | None = None
    error: str | None = None
    with terminate_on_sigterm():
        try:
            result = run(args, work, processes)
        except (TimeoutError, RuntimeError) as exc:
            error = str(exc)
            print(f"FAILED: {error}", flush=True)
        except KeyboardInterrupt:
            error = "interrupted"
        finally:
            processes.kill_all()
    if result is not None:
        rows = result["rounds"]
        print()
        if rows:
            print(f"clients joined after {rows[0]['joined_after_seconds']:.1f}s")
        print(
            f"client exits: {result['clients_reported'] - result['failed_client_count']} ok, "
            f"{result['failed_client_count']} failed {result['failed_clients'] or ''}"
        )
        print(
            f"coordinator: exit {result['server_exit']}, peak RSS "
            f"{result['server_peak_rss_bytes'] / MIB:.0f} MiB, peak threads "
            f"{result['server_peak_threads']}, peak fds {result['server_peak_fds']}, "
            f"{result['server_warning_count']} warnings/errors logged"
        )
        for line in result["server_warnings"][:10]:
            print(f"  {line}")
        print(f"workers: {result['worker_warning_count']} warnings/errors logged")
        print(f"{'PASS' if result['passed'] else 'FAIL'}")
    failed = error is not None or result is None or not result["passed"]
    document = {
        **results_header("load"),
        "settings": {
            "clients": args.clients,
            "workers": args.workers,
            "rounds": args.rounds,
            "model": args.model,
            "fraction_fit": 1.0,
            "evaluate_every": 0,
            "secure_aggregation": bool(args.secure or args.secagg_neighbours),
            "secagg_neighbours": args.secagg_neighbours,
            "transport": "gRPC over mutual TLS on 127.0.0.1, one certificate per client",
        },
        "elapsed_seconds": time.monotonic() - began,
        "error": error,
        "result": result,
    }
    return save_results(args, document, work, failed)


if __name__ == "__main__":
    sys.exit(main())
