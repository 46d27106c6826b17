"""Load benchmark: one coordinator serving thousands of concurrent clients over mutual TLS.

    .venv/bin/python benchmarks/load.py                        # 300 clients, 10 rounds
    .venv/bin/python benchmarks/load.py --clients 600 --workers 6
    .venv/bin/python benchmarks/load.py --protocol --clients 300,1000,2000 --rounds 3
    .venv/bin/python benchmarks/load.py --protocol --clients 10000 --fraction 0.1 --rounds 3
    .venv/bin/python benchmarks/load.py --clients 100 --workers 2 --rounds 4 --secure
    .venv/bin/python benchmarks/load.py --clients 100 --workers 2 --rounds 4 --secagg-neighbours 14

A real coordinator (`fedlink server`) runs the no-op task (benchmarks/noop_task.py) with its tiny
model, no federated evaluation; each round samples `--fraction` of the connected clients
(default: all). All clients connect at once, each with its own certificate (identity), channel
and TLS connection. Two kinds of client:

- default: the real client code, `fedlink.client.app.FederationClient`, as threads of a few
  worker processes (hundreds of processes importing torch would not fit in memory).
  `--secure` runs every round under secure aggregation, `--secagg-neighbours K` under SecAgg+.
- `--protocol`: protocol-level clients (benchmarks/protocol_clients.py), thousands per process as
  grpc.aio coroutines, speaking the real wire protocol (Join, PullTask long polls, chunked
  download and upload, heartbeats, the real client's retries) without torch and without training:
  each sends the global model back as its update. The clients cost little CPU, so what is
  measured is the coordinator; 10,000 identities fit on a 2-core machine.

`--clients` takes one level or several (`300,1000,2000`; `10000:0.1` gives a level its own
fraction); each level runs against a fresh coordinator, under its own `--timeout` (a level that
runs past it is reported as collapsed). Per level it prints the time until every client had
joined, round seconds (p50/max), clients sampled and accepted per round, failures by kind (client
side: identities that gave up, and retried RPC errors; coordinator side: rejected results and
superseded sessions), the coordinator's peak RSS, threads and file descriptors (from /proc), and
its CPU seconds per round; over the levels, a least-squares fit of coordinator CPU per round
against clients sampled. Writes JSON (default benchmarks/results/load.json).

The benchmark raises the coordinator's `max_connections` to the clients plus a margin and
`max_concurrent_rpcs` to three calls per client (a poll or upload, a heartbeat, a join), so those
caps never refuse a legitimate client; `--server-arg` passes further `fedlink server` flags.
Every connection is one file descriptor on each side: the benchmark raises its soft
RLIMIT_NOFILE (inherited by the coordinator and the workers) to what the largest level needs,
and stops with an error if the hard limit is lower (`ulimit -Hn`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol_clients import issue_identities, raise_fd_limit
from protocol_clients import run_worker as run_protocol_worker
from soak import RoundCounter, proc_status
from transport import (
    BENCH_DIR,
    MIB,
    STARTUP_TIMEOUT_SECONDS,
    TASK,
    Processes,
    child_env,
    machine_busy_seconds,
    make_certificates,
    process_cpu,
    reap,
    results_header,
    save_results,
    terminate_on_sigterm,
    try_reap,
    wait_for_file,
)

from fedlink.common.pki import init_ca, issue_certificate

DEFAULT_OUT = BENCH_DIR / "results" / "load.json"
MODELS = ("tiny", "cnn1.66m")
POLL_SECONDS = 0.1
# Listing /proc/<pid>/fd with 10,000 entries costs milliseconds: done every this many polls,
# or at every poll while the coordinator holds fewer descriptors than this.
FD_POLL_EVERY = 5
FD_POLL_ALWAYS_BELOW = 1000
# Connections beyond the clients': health checks, monitors.
CONNECTION_MARGIN = 64
# Calls one client may have in progress or queued: a poll or an upload, a heartbeat, a join.
CALLS_PER_CLIENT = 3
DEFAULT_MAX_CONCURRENT_RPCS = 2048  # the coordinator's default (server/config.py)
# Descriptors a process needs besides its connections (libraries, logs, files being written).
FD_MARGIN = 512
# How long workers get to report after the coordinator exits or is killed.
WORKER_REPORT_SECONDS = 60.0
SUPERSEDED = "previous session is superseded"


# ---- the thread worker: many FederationClients as threads ----------------------------------


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
    failed = {name: outcome for name, outcome in outcomes.items() if outcome != "exit 0"}
    record = {
        "event": "report",
        "identities": args.count,
        "stopped": len(outcomes) - len(failed),
        "fatal": dict(Counter(outcome.split(":", 1)[0] for outcome in failed.values())),
        "fatal_examples": [f"{name}: {outcome}" for name, outcome in sorted(failed.items())[:10]],
        "errors": {},
    }
    print(json.dumps(record), flush=True)
    return 0


# ---- levels and certificates -----------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One measurement: this many clients connected, this fraction of them sampled per round."""

    clients: int
    fraction: float

    @property
    def sampled(self) -> int:
        """Clients sampled per round: the coordinator's ceil(fraction x alive)."""
        return math.ceil(self.fraction * self.clients)

    def describe(self) -> str:
        return f"{self.clients} clients, {self.sampled} sampled"


def parse_levels(text: str, fraction: float) -> list[Level]:
    """`300,1000,10000:0.1`: client counts, each with an optional fraction of its own."""
    levels = []
    for item in text.split(","):
        count, _, own = item.strip().partition(":")
        try:
            level = Level(int(count), float(own) if own else fraction)
        except ValueError:
            raise ValueError(f"{item!r} is not N or N:FRACTION") from None
        if level.clients < 1 or not 0.0 < level.fraction <= 1.0:
            raise ValueError(f"{item!r}: need N >= 1 and a fraction in (0, 1]")
        levels.append(level)
    return levels


@dataclass(frozen=True)
class Certs:
    """The server's bundle and where the clients' certificates are."""

    server: Path  # directory with server.pem, server.key, ca.pem
    clients: Path  # threads: one bundle per client; protocol: protocol_clients.IdentityFiles
    issue_seconds: float


def prepare_certificates(work: Path, clients: int, protocol: bool) -> Certs:
    began = time.monotonic()
    if not protocol:
        make_certificates(work / "certs", clients)
        return Certs(work / "certs" / "server", work / "certs", time.monotonic() - began)
    ca = work / "certs" / "ca"
    init_ca(ca)
    server = work / "certs" / "server"
    issue_certificate(ca, server, "server", role="server", hosts=["localhost", "127.0.0.1"])
    identities = work / "certs" / "identities"
    issue_identities(ca, identities, [f"client-{i}" for i in range(1, clients + 1)])
    return Certs(server, identities, time.monotonic() - began)


# ---- one level -------------------------------------------------------------------------------


class WorkerOutput:
    """A worker's JSON lines, read in a thread so a full pipe never blocks the worker."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.records: list[dict[str, Any]] = []
        self._process = process
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            try:
                self.records.append(json.loads(line))
            except ValueError:
                continue  # not ours (a library printing to stdout)

    def event(self, name: str) -> dict[str, Any] | None:
        return next((r for r in self.records if r.get("event") == name), None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def server_command(args: argparse.Namespace, level: Level, certs: Certs, work: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fedlink",
        "server",
        "--listen",
        "127.0.0.1:0",
        "--address-file",
        str(work / "server.address"),
        "--cert",
        str(certs.server / "server.pem"),
        "--key",
        str(certs.server / "server.key"),
        "--ca",
        str(certs.server / "ca.pem"),
        "--task",
        TASK,
        "--num-rounds",
        str(args.rounds),
        "--min-clients",
        str(level.clients),
        "--fraction-fit",
        repr(level.fraction),
        "--min-fit-clients",
        str(level.sampled),
        "--evaluate-every",
        "0",
        "--round-timeout-seconds",
        str(args.round_timeout),
        "--run-dir",
        str(work / "run"),
        "--state-dir",
        str(work / "state"),
        *coordinator_limits(level),
        *secure_flags(args),
        *shlex.split(args.server_args),
    ]


def coordinator_limits(level: Level) -> list[str]:
    """The caps the benchmark raises so that they never refuse a legitimate client."""
    return [
        "--max-connections",
        str(level.clients + CONNECTION_MARGIN),
        "--max-concurrent-rpcs",
        str(max(DEFAULT_MAX_CONCURRENT_RPCS, CALLS_PER_CLIENT * level.clients)),
    ]


def worker_command(
    args: argparse.Namespace, certs: Certs, work: Path, address: str, first: int, count: int
) -> list[str]:
    if args.protocol:
        return [
            sys.executable,
            str(Path(__file__).resolve()),
            "protocol-worker",
            "--server",
            address,
            "--certs",
            str(certs.clients),
            "--first",
            str(first),
            "--count",
            str(count),
        ]
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        "worker",
        "--server",
        address,
        "--certs",
        str(certs.clients),
        "--spool",
        str(work / "spool"),
        "--first",
        str(first),
        "--count",
        str(count),
    ]


def run_level(
    args: argparse.Namespace, level: Level, certs: Certs, work: Path, processes: Processes
) -> dict[str, Any]:
    """Run one coordinator with `level.clients` clients; its measurements."""
    env = child_env(args.model)
    logs = work / "logs"
    logs.mkdir(parents=True)
    server = processes.spawn(
        server_command(args, level, certs, work), logs / "server.log", env, work
    )
    address = wait_for_file(work / "server.address", server, STARTUP_TIMEOUT_SECONDS)
    workers: list[subprocess.Popen[bytes]] = []
    outputs: list[WorkerOutput] = []
    per_worker = -(-level.clients // args.workers)
    started = time.monotonic()
    cpu_start = sum(process_cpu(server.pid))
    machine_start, load_start = machine_busy_seconds(), os.getloadavg()[0]
    last_cpu = cpu_start
    for w in range(args.workers):
        first = w * per_worker  # 0-based; client names start at 1
        count = min(per_worker, level.clients - first)
        if count <= 0:
            break
        # The thread worker's --first is the first client's number (1-based).
        first_arg = first if args.protocol else first + 1
        worker = processes.spawn(
            worker_command(args, certs, work, address, first_arg, count),
            logs / f"worker-{w + 1}.log",
            env,
            work,
            pipes=True,
        )
        workers.append(worker)
        outputs.append(WorkerOutput(worker))
    print(
        f"  {level.describe()}: {len(workers)} worker processes connecting to {address}",
        flush=True,
    )
    counter = RoundCounter(work / "run" / "metrics.jsonl")
    rows: list[dict[str, Any]] = []
    cpu_before = cpu_start
    peak = {"threads": 0, "fds": 0, "rss_bytes": 0}
    joined_seconds: float | None = None
    join_cpu: float | None = None
    collapsed_after: float | None = None
    polls = 0
    server_exit = None
    while (server_exit := try_reap(server)) is None:
        now = time.monotonic()
        if now - started > args.timeout:
            collapsed_after = now - started
            break
        try:
            status = proc_status(server.pid)
            if peak["fds"] < FD_POLL_ALWAYS_BELOW or polls % FD_POLL_EVERY == 0:
                peak["fds"] = max(peak["fds"], len(os.listdir(f"/proc/{server.pid}/fd")))
        except OSError:  # exiting
            status = {}
        if "rss_bytes" not in status:  # exiting: a zombie has no memory left to report
            time.sleep(POLL_SECONDS)
            continue
        polls += 1
        # The coordinator's CPU so far (zeros once it is gone, so kept from the last poll).
        last_cpu = max(last_cpu, sum(process_cpu(server.pid)))
        peak["threads"] = max(peak["threads"], status["threads"])
        peak["rss_bytes"] = max(peak["rss_bytes"], status["rss_bytes"])
        joined = [o.event("joined") for o in outputs]
        if joined_seconds is None and args.protocol and all(joined):
            joined_seconds = max(float(j["at"]) for j in joined if j) - started
            join_cpu = sum(process_cpu(server.pid)) - cpu_start
            print(f"  all {level.clients} joined after {joined_seconds:.1f}s", flush=True)
        if counter.poll() > len(rows):
            cpu = sum(process_cpu(server.pid))
            for record in read_rows(work / "run" / "metrics.jsonl")[len(rows) :]:
                if joined_seconds is None and not rows:
                    # Real clients announce nothing: round 1 began once all had joined.
                    joined_seconds = time.monotonic() - started - record["seconds"]
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
                }
                rows.append(row)
                print(format_round(row), flush=True)
            cpu_before = cpu
        time.sleep(POLL_SECONDS)
    server_cpu = max(last_cpu, sum(process_cpu(server.pid))) - cpu_start
    machine_cpu = machine_busy_seconds() - machine_start
    if server_exit is None:  # collapsed: stop the coordinator, then ask the workers to report
        print(f"  collapsed: {len(rows)} of {args.rounds} rounds after {collapsed_after:.0f}s")
        server.kill()
        server_exit = reap(server, time.monotonic() + 30)
        for worker in workers:
            if worker.returncode is None:
                worker.send_signal(signal.SIGTERM)
    reports = collect_reports(workers, outputs)
    peak["rss_polled"] = peak["rss_bytes"]
    peak["rss_bytes"] = max(peak["rss_bytes"], server_exit.peak_rss_bytes)
    return summarize(
        args,
        level,
        work,
        rows,
        reports,
        peak=peak,
        server_exit=server_exit.returncode,
        joined_seconds=joined_seconds,
        join_cpu=join_cpu,
        machine=(load_start, server_cpu, machine_cpu),
        collapsed_after=collapsed_after,
        wall=time.monotonic() - started,
    )


def collect_reports(
    workers: Sequence[subprocess.Popen[bytes]], outputs: Sequence[WorkerOutput]
) -> list[dict[str, Any]]:
    """Each worker's final report (missing for a worker that had to be killed)."""
    deadline = time.monotonic() + WORKER_REPORT_SECONDS
    reports = []
    for worker, output in zip(workers, outputs, strict=True):
        try:
            if worker.returncode is None:  # not yet reaped (Popen.send_signal may have)
                reap(worker, deadline)
        except TimeoutError:
            worker.kill()
            reap(worker, time.monotonic() + 10)
        output.join(10)
        report = output.event("report")
        if report is not None:
            reports.append(report)
    return reports


def summarize(
    args: argparse.Namespace,
    level: Level,
    work: Path,
    rows: list[dict[str, Any]],
    reports: list[dict[str, Any]],
    *,
    peak: dict[str, int],
    server_exit: int,
    joined_seconds: float | None,
    join_cpu: float | None,
    machine: tuple[float, float, float],
    collapsed_after: float | None,
    wall: float,
) -> dict[str, Any]:
    """One level's measurements (the JSON `levels` entry)."""
    fatal: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    examples: list[str] = []
    retried_examples: dict[str, list[str]] = {}
    calls: Counter[str] = Counter()
    for report in reports:
        calls.update(report.get("calls", {}))
        fatal.update(report.get("fatal", {}))
        errors.update(report.get("errors", {}))
        examples.extend(report.get("fatal_examples", []))
        for kind, seen in report.get("error_examples", {}).items():
            retried_examples.setdefault(kind, []).extend(
                seen[: 3 - len(retried_examples.get(kind, []))]
            )
    server_log = (work / "logs" / "server.log").read_text(errors="replace").splitlines()
    warnings = [line for line in server_log if " WARNING " in line or " ERROR " in line]
    rejected = Counter(
        reason.split(":", 1)[0] for row in rows for reason in row["rejected"].values()
    )
    seconds = [row["seconds"] for row in rows]
    # Round 1 carries the joins (handshakes, certificate checks): the per-round cost is the
    # mean of the rounds after it, when there are any.
    steady = [row["cpu_seconds"] for row in rows[1:]] or [row["cpu_seconds"] for row in rows]
    failures = {
        **{f"client gave up: {kind}": n for kind, n in sorted(fatal.items())},
        **{f"client retried: {kind}": n for kind, n in sorted(errors.items())},
        **{f"coordinator rejected: {kind}": n for kind, n in sorted(rejected.items())},
    }
    superseded = sum(SUPERSEDED in line for line in warnings)
    if superseded:
        failures["coordinator: session superseded by a join retry"] = superseded
    if len(reports) < args.workers and collapsed_after is None:
        failures["worker without a report"] = args.workers - len(reports)
    stopped = sum(int(r.get("stopped", 0)) for r in reports)
    load_start, server_cpu, machine_cpu = machine
    worker_cpu = sum(float(r.get("cpu_seconds", 0.0)) for r in reports)
    return {
        "clients": level.clients,
        "fraction": level.fraction,
        "sampled": level.sampled,
        "joined_seconds": joined_seconds,  # until every client had joined (None: some never did)
        "clients_joined": sum(int(r.get("joined", 0)) for r in reports),
        "join_cpu_seconds": join_cpu,
        "join_latency_max": max(
            (r["join_latency_max"] for r in reports if r.get("join_latency_max") is not None),
            default=None,
        ),
        "rounds_completed": len(rows),
        "round_seconds_p50": statistics.median(seconds) if seconds else None,
        "round_seconds_max": max(seconds, default=None),
        "accepted_per_round": [row["accepted"] for row in rows],
        "sampled_per_round": [row["sampled"] for row in rows],
        "cpu_seconds_per_round": statistics.mean(steady) if steady else None,
        "failures": failures,
        # Everything in `failures`: a retried call is a call the coordinator did not serve.
        "failure_count": sum(failures.values()),
        "failure_examples": examples[:10],
        # Calls the protocol clients made, by RPC, per client and round (joins: per client).
        "calls_per_client_round": {
            rpc: round(n / level.clients / (1 if rpc == "join" else max(1, len(rows))), 2)
            for rpc, n in sorted(calls.items())
        },
        # What gRPC said of the first retried calls of each kind (protocol clients).
        "retried_examples": retried_examples,
        "server_exit": server_exit,
        "server_peak_rss_bytes": peak["rss_bytes"],
        # VmRSS seen while the level ran (the peak above is the process's lifetime ru_maxrss).
        "server_rss_polled_peak_bytes": peak["rss_polled"],
        "server_peak_threads": peak["threads"],
        "server_peak_fds": peak["fds"],
        "server_warning_count": len(warnings),
        "server_warnings": warnings[:20],
        "clients_stopped": stopped,
        "worker_cpu_seconds": worker_cpu,
        # A quiet machine is assumed: the load average when the level began, and the CPU
        # seconds everything else on the machine used while it ran (a coordinator killed on
        # collapse is counted up to then).
        "load_average_at_start": load_start,
        "server_cpu_seconds": server_cpu,
        "other_cpu_seconds": max(0.0, machine_cpu - server_cpu - worker_cpu),
        "worker_peak_rss_bytes": max((int(r.get("peak_rss_bytes", 0)) for r in reports), default=0),
        "collapsed_after_seconds": collapsed_after,
        "wall_seconds": wall,
        "rounds": rows,
        "passed": collapsed_after is None
        and server_exit == 0
        and len(rows) == args.rounds
        and stopped == level.clients
        and not failures
        and all(r["accepted"] == r["sampled"] == level.sampled for r in rows),
    }


def linear_fit(points: Sequence[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares y = intercept + slope x, with R^2; None with fewer than two distinct x."""
    if len({x for x, _ in points}) < 2:
        return None
    xs, ys = [x for x, _ in points], [y for _, y in points]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    intercept = my - slope * mx
    total = sum((y - my) ** 2 for y in ys)
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points)
    return {
        "slope": slope,
        "intercept": intercept,
        "r_squared": 1.0 - residual / total if total else 1.0,
    }


def cpu_fit(levels: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Coordinator CPU seconds per round against clients sampled, over the levels that ran
    all their rounds (a collapsed level's rounds are not the steady state being fitted)."""
    points = [
        (float(level["sampled"]), float(level["cpu_seconds_per_round"]))
        for level in levels
        if level["collapsed_after_seconds"] is None
        and level["rounds_completed"]
        and level["cpu_seconds_per_round"] is not None
    ]
    fit = linear_fit(points)
    if fit is None:
        return None
    return {
        "x": "clients sampled",
        "y": "coordinator CPU seconds per round",
        "points": points,
        **fit,
    }


def secure_flags(args: argparse.Namespace) -> list[str]:
    """The coordinator's secure-aggregation options for this run (none: plaintext)."""
    if args.secagg_neighbours:
        return ["--secure-aggregation", "--secagg-neighbours", str(args.secagg_neighbours)]
    return ["--secure-aggregation"] if args.secure else []


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def format_round(row: dict[str, Any]) -> str:
    return (
        f"    round {row['round']:>3}: {row['seconds']:8.2f}s, {row['accepted']}/{row['sampled']} "
        f"accepted, {len(row['rejected'])} rejected, coordinator {row['rss_bytes'] / MIB:.0f} MiB, "
        f"{row['cpu_seconds']:.2f} CPU s, {row['threads']} threads"
    )


HEADER = (
    f"{'clients':>7} {'sampled':>7} {'joined s':>8} {'rounds':>6} {'p50 s':>7} {'max s':>7} "
    f"{'accepted':>9} {'failures':>8} {'RSS MiB':>7} {'threads':>7} {'fds':>6} {'CPU s/rnd':>9}"
)


def format_level(level: dict[str, Any]) -> str:
    def number(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    accepted = level["accepted_per_round"]
    shown = f"{min(accepted)}-{max(accepted)}" if accepted else "-"
    line = (
        f"{level['clients']:>7} {level['sampled']:>7} {number(level['joined_seconds'], '8.1f'):>8} "
        f"{level['rounds_completed']:>6} {number(level['round_seconds_p50'], '7.2f'):>7} "
        f"{number(level['round_seconds_max'], '7.2f'):>7} {shown:>9} "
        f"{level['failure_count']:>8} {level['server_peak_rss_bytes'] / MIB:>7.0f} "
        f"{level['server_peak_threads']:>7} {level['server_peak_fds']:>6} "
        f"{number(level['cpu_seconds_per_round'], '9.2f'):>9}"
    )
    if level["collapsed_after_seconds"] is not None:
        line += f"  collapsed after {level['collapsed_after_seconds']:.0f}s"
    return line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one coordinator, many concurrent mTLS clients")
    commands = parser.add_subparsers(dest="command")
    worker = commands.add_parser("worker", help="(internal) run real clients as threads")
    worker.add_argument("--server", required=True)
    worker.add_argument("--certs", type=Path, required=True)
    worker.add_argument("--spool", type=Path, required=True)
    worker.add_argument("--first", type=int, required=True)
    worker.add_argument("--count", type=int, required=True)
    protocol = commands.add_parser("protocol-worker", help="(internal) protocol-level clients")
    protocol.add_argument("--server", required=True)
    protocol.add_argument("--certs", type=Path, required=True)
    protocol.add_argument("--first", type=int, required=True)
    protocol.add_argument("--count", type=int, required=True)
    parser.add_argument(
        "--clients",
        default="300",
        help="clients connected: N, or levels N1,N2,... each optionally N:FRACTION",
    )
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="fraction of clients sampled per round"
    )
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument(
        "--protocol",
        action="store_true",
        help="protocol-level clients (grpc.aio, no torch, no training) instead of real ones",
    )
    parser.add_argument("--round-timeout", type=float, default=300.0, help="seconds per round")
    parser.add_argument(
        "--timeout",
        type=float,
        default=1200.0,
        help="seconds per level; a level still running then is reported as collapsed",
    )
    parser.add_argument(
        "--server-args", default="", help="more `fedlink server` flags, as one shell string"
    )
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
    if args.command is not None:
        return args
    if args.secagg_neighbours and (args.secagg_neighbours < 2 or args.secagg_neighbours % 2):
        parser.error("--secagg-neighbours must be an even number >= 2")
    if args.protocol and (args.secure or args.secagg_neighbours):
        parser.error(
            "protocol-level clients do not implement secure aggregation; drop --protocol to "
            "run it with real clients"
        )
    try:
        args.levels = parse_levels(args.clients, args.fraction)
    except ValueError as exc:
        parser.error(f"--clients: {exc}")
    smallest = min(level.clients for level in args.levels)
    if not (1 <= args.workers <= smallest and args.rounds >= 1):
        parser.error("need 1 <= workers <= clients and rounds >= 1")
    return args


def fd_limit(levels: Sequence[Level]) -> int:
    """Raise the soft RLIMIT_NOFILE (inherited by every child) to what the largest level needs
    (the coordinator: one descriptor per connection); RuntimeError when the hard limit is lower."""
    needed = max(level.clients for level in levels) + CONNECTION_MARGIN + FD_MARGIN
    limit = raise_fd_limit(needed)
    if limit < needed:
        raise RuntimeError(
            f"{needed} file descriptors needed, the hard limit is {limit}: raise it "
            "(`ulimit -Hn`, or nofile in /etc/security/limits.conf) or run fewer clients"
        )
    return limit


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "worker":
        return run_worker(args)
    if args.command == "protocol-worker":
        return run_protocol_worker(args.server, args.certs, args.first, args.count)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedlink-load-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    processes = Processes()
    levels: list[dict[str, Any]] = []
    error: str | None = None
    limit = issue_seconds = None
    with terminate_on_sigterm():
        try:
            limit = fd_limit(args.levels)
            largest = max(level.clients for level in args.levels)
            print(f"issuing {largest} client certificates ...", flush=True)
            certs = prepare_certificates(work, largest, args.protocol)
            issue_seconds = certs.issue_seconds
            print(f"  issued in {issue_seconds:.1f}s", flush=True)
            for index, level in enumerate(args.levels):
                print(f"level {index + 1}/{len(args.levels)}: {level.describe()}", flush=True)
                try:
                    levels.append(
                        run_level(args, level, certs, work / f"level-{index + 1}", processes)
                    )
                finally:
                    processes.kill_all()
        except (TimeoutError, RuntimeError) as exc:
            error = str(exc)
            print(f"FAILED: {error}", flush=True)
        except KeyboardInterrupt:
            error = "interrupted"
        finally:
            processes.kill_all()
    fit = cpu_fit(levels)
    if levels:
        print()
        print(HEADER)
        print("-" * len(HEADER))
        for level in levels:
            print(format_level(level))
            print(
                f"        load {level['load_average_at_start']:.1f} at start; CPU s: coordinator "
                f"{level['server_cpu_seconds']:.0f}, clients {level['worker_cpu_seconds']:.0f}, "
                f"other processes {level['other_cpu_seconds']:.0f}"
            )
            if level["calls_per_client_round"]:
                calls = ", ".join(f"{k} {v}" for k, v in level["calls_per_client_round"].items())
                print(f"        calls per client and round: {calls}")
            for kind, count in level["failures"].items():
                print(f"        {count:>6} x {kind}")
        if fit is not None:
            print(
                f"coordinator CPU per round = {fit['intercept']:.3f} s + {fit['slope'] * 1000:.2f} "
                f"ms x clients sampled (R^2 {fit['r_squared']:.3f})"
            )
        print("PASS" if all(level["passed"] for level in levels) else "FAIL")
    failed = error is not None or not levels or not all(level["passed"] for level in levels)
    document = {
        **results_header("load"),
        "settings": {
            "clients": args.clients,
            "levels": [{"clients": lv.clients, "fraction": lv.fraction} for lv in args.levels],
            "clients_kind": "protocol" if args.protocol else "threads",
            "workers": args.workers,
            "rounds": args.rounds,
            "model": args.model,
            "evaluate_every": 0,
            "round_timeout_seconds": args.round_timeout,
            "level_timeout_seconds": args.timeout,
            "secure_aggregation": bool(args.secure or args.secagg_neighbours),
            "secagg_neighbours": args.secagg_neighbours,
            "coordinator_limits": "max_connections = clients + "
            f"{CONNECTION_MARGIN}, max_concurrent_rpcs = max({DEFAULT_MAX_CONCURRENT_RPCS}, "
            f"{CALLS_PER_CLIENT} x clients)",
            "server_args": args.server_args,
            "fd_soft_limit": limit,
            "certificate_issue_seconds": issue_seconds,
            "transport": "gRPC over mutual TLS on 127.0.0.1, one certificate per client",
        },
        "elapsed_seconds": time.monotonic() - began,
        "error": error,
        "levels": levels,
        "cpu_fit": fit,
    }
    return save_results(args, document, work, failed)


if __name__ == "__main__":
    sys.exit(main())
