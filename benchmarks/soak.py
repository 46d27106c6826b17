"""Soak benchmark: a long run of short rounds; the coordinator's memory and state must not grow.

    .venv/bin/python benchmarks/soak.py                    # 1000 rounds, 3 clients
    .venv/bin/python benchmarks/soak.py --rounds 200 --clients 2

It starts a real coordinator (`fedlink server`) and N client processes over mutual TLS on
127.0.0.1, as benchmarks/transport.py does, with the no-op task (benchmarks/noop_task.py) and its
tiny model (a 2,410-parameter MLP), and no federated evaluation: each round is download, load,
serialize, upload, validate, aggregate, checkpoint, and a thousand rounds take about a minute on 2 cores.

While the rounds run it samples the coordinator from /proc: resident memory (VmRSS), threads,
open file descriptors and CPU time, and the state directory (checkpoints, global models, spooled
uploads in incoming/, total bytes): after the warm-up round, every --sample-every rounds, and at
the last round. The coordinator is given a few rounds more than measured, so the last sample is
taken inside its round loop, not while it draws its end-of-run plot.

Pass: RSS at the last round is within --max-growth-mib of RSS after the warm-up and its trend
over the second half of the run (least squares) is under --max-slope-kib per round; threads and
file descriptors stop growing; the state directory never holds more than keep_checkpoints
checkpoints (and their models plus the previous round's); incoming/ is empty once the
coordinator has exited; every round accepted every client. Prints a table and writes JSON (default
benchmarks/results/soak.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transport import (
    BENCH_DIR,
    CLIENT_EXIT_SECONDS,
    MIB,
    STARTUP_TIMEOUT_SECONDS,
    TASK,
    Processes,
    child_env,
    make_certificates,
    model_info,
    process_cpu,
    reap,
    results_header,
    save_results,
    terminate_on_sigterm,
    try_reap,
    wait_for_file,
)

DEFAULT_OUT = BENCH_DIR / "results" / "soak.json"
MODEL = "tiny"
# Rounds run after the last measured one (see the module docstring).
TAIL_ROUNDS = 5
# The coordinator's default; passed explicitly so the state-directory check knows it.
KEEP_CHECKPOINTS = 3
POLL_SECONDS = 0.01
IN_FLIGHT_PER_CLIENT = 2


@dataclass(frozen=True)
class Sample:
    round: int
    seconds: float  # since the warm-up sample
    rss_bytes: int
    threads: int
    fds: int
    cpu_seconds: float  # the coordinator's user + system time so far
    checkpoints: int
    global_models: int
    incoming: int  # files in incoming/ (spooled uploads)
    state_bytes: int


@dataclass(frozen=True)
class StateDir:
    checkpoints: int
    global_models: int
    incoming: int
    bytes: int


def state_dir_contents(state: Path) -> StateDir:
    """What the coordinator keeps on disk (files may vanish while we look: it prunes as it goes)."""
    checkpoints = globals_ = incoming = size = 0
    for path in state.rglob("*"):
        try:
            if not path.is_file():
                continue
            size += path.stat().st_size
        except FileNotFoundError:
            continue
        if path.parent.name == "checkpoints":
            checkpoints += 1
        elif path.parent.name == "incoming":
            incoming += 1
        elif path.name.startswith("global-"):
            globals_ += 1
    return StateDir(checkpoints, globals_, incoming, size)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (bytes) and Threads of a live process, from /proc/<pid>/status."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name == "VmRSS":
                values["rss_bytes"] = int(rest.split()[0]) * 1024
            elif name == "Threads":
                values["threads"] = int(rest.split()[0])
    return values


def sample(pid: int, round_number: int, since: float, state: Path) -> Sample:
    status = proc_status(pid)
    user, system = process_cpu(pid)
    contents = state_dir_contents(state)
    return Sample(
        round=round_number,
        seconds=time.monotonic() - since,
        rss_bytes=status["rss_bytes"],
        threads=status["threads"],
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        cpu_seconds=user + system,
        checkpoints=contents.checkpoints,
        global_models=contents.global_models,
        incoming=contents.incoming,
        state_bytes=contents.bytes,
    )


class RoundCounter:
    """Counts the rows of metrics.jsonl as the coordinator appends them (reads only new bytes)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.rounds = 0

    def poll(self) -> int:
        try:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.rounds
        self._offset += len(data)
        self.rounds += data.count(b"\n")
        return self.rounds


def sample_rounds(rounds: int, warmup: int, every: int) -> list[int]:
    points = list(range(warmup, rounds, every))
    return [*points, rounds] if points[-1:] != [rounds] else points


def run(args: argparse.Namespace, work: Path, processes: Processes) -> dict[str, Any]:
    certs = make_certificates(work / "certs", args.clients)
    env = child_env(MODEL)
    run_dir, state, logs = work / "run", work / "state", work / "logs"
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
            *certs.server.args(),
            "--task",
            TASK,
            "--num-rounds",
            str(args.rounds + TAIL_ROUNDS),
            "--min-clients",
            str(args.clients),
            "--min-fit-clients",
            str(args.clients),
            "--evaluate-every",
            "0",
            "--keep-checkpoints",
            str(KEEP_CHECKPOINTS),
            "--run-dir",
            str(run_dir),
            "--state-dir",
            str(state),
        ],
        logs / "server.log",
        env,
        work,
    )
    address = wait_for_file(address_file, server, STARTUP_TIMEOUT_SECONDS)
    clients = []
    for index in range(args.clients):
        spool = work / f"spool-{index + 1}"
        spool.mkdir()
        clients.append(
            processes.spawn(
                [
                    sys.executable,
                    "-m",
                    "fedlink",
                    "client",
                    "--server",
                    address,
                    *certs.clients[index].args(),
                    "--task",
                    TASK,
                    "--device",
                    "cpu",
                    "--spool-dir",
                    str(spool),
                ],
                logs / f"client-{index + 1}.log",
                env,
                work,
            )
        )
    counter = RoundCounter(run_dir / "metrics.jsonl")
    targets = sample_rounds(args.rounds, args.warmup, args.sample_every)
    samples: list[Sample] = []
    most_checkpoints = most_globals = 0
    since = time.monotonic()
    deadline = since + args.timeout
    while targets:
        if try_reap(server) is not None:
            raise RuntimeError(f"the coordinator exited early (status {server.returncode})")
        if time.monotonic() > deadline:
            raise TimeoutError(f"round {counter.rounds} of {args.rounds} after {args.timeout:.0f}s")
        done = counter.poll()
        if done >= targets[0]:
            if not samples:
                since = time.monotonic()
            taken = sample(server.pid, done, since, state)
            samples.append(taken)
            most_checkpoints = max(most_checkpoints, taken.checkpoints)
            most_globals = max(most_globals, taken.global_models)
            print(format_row(samples), flush=True)
            while targets and targets[0] <= done:
                targets.pop(0)
        time.sleep(POLL_SECONDS)
    server_exit = reap(server, time.monotonic() + args.timeout)
    client_exits = [reap(c, time.monotonic() + CLIENT_EXIT_SECONDS) for c in clients]
    after_exit = state_dir_contents(state)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    failures = [
        f"round {r['round']}: {r['clients_accepted']}/{r['clients_sampled']} accepted "
        f"{r['rejected']}"
        for r in rows
        if r["clients_accepted"] != r["clients_sampled"] or r["rejected"]
    ]
    first, last = samples[0], samples[-1]
    growth = (last.rss_bytes - first.rss_bytes) / MIB
    early, late = samples[: len(samples) // 2], samples[len(samples) // 2 :]
    slope = rss_slope(late)
    checks = [
        {
            "check": f"coordinator RSS growth from round {first.round} to {last.round} "
            f"<= {args.max_growth_mib:g} MiB",
            "value": growth,
            "passed": growth <= args.max_growth_mib,
        },
        {
            "check": f"coordinator RSS trend from round {late[0].round} on "
            f"<= {args.max_slope_kib:g} KiB/round",
            "value": slope,
            "passed": slope <= args.max_slope_kib,
        },
        {
            # Calls in flight hold a handler thread and a file (an upload's spool, a download's
            # global model) for a moment: two per client either way. A leak grows past that.
            "check": "coordinator threads and file descriptors stop growing (second half of the "
            f"run within {IN_FLIGHT_PER_CLIENT} per client of the first half's peak)",
            "value": [max(s.threads for s in late), max(s.fds for s in late)],
            "passed": max(s.threads for s in late)
            <= max(s.threads for s in early) + IN_FLIGHT_PER_CLIENT * args.clients
            and max(s.fds for s in late)
            <= max(s.fds for s in early) + IN_FLIGHT_PER_CLIENT * args.clients,
        },
        {
            "check": f"at most keep_checkpoints={KEEP_CHECKPOINTS} checkpoints and "
            f"{KEEP_CHECKPOINTS + 1} global models on disk",
            "value": [most_checkpoints, most_globals],
            "passed": most_checkpoints <= KEEP_CHECKPOINTS and most_globals <= KEEP_CHECKPOINTS + 1,
        },
        {
            "check": "incoming/ empty after the run",
            "value": after_exit.incoming,
            "passed": after_exit.incoming == 0,
        },
        {
            "check": "every round accepted every sampled client; all processes exited 0",
            "value": len(failures),
            "passed": not failures
            and server_exit.returncode == 0
            and all(e.returncode == 0 for e in client_exits),
        },
    ]
    return {
        "payload_bytes": model_info(MODEL)[0].payload_bytes,
        "rounds_run": len(rows),
        "samples": [asdict(s) for s in samples],
        "state_dir_after_exit": asdict(after_exit),
        "server_exit": server_exit.returncode,
        "server_peak_rss_bytes": server_exit.peak_rss_bytes,
        "client_exits": [e.returncode for e in client_exits],
        "round_failures": failures[:20],
        "mean_round_seconds": sum(r["seconds"] for r in rows) / len(rows),
        "checks": checks,
    }


def rss_slope(samples: Sequence[Sample]) -> float:
    """Least-squares slope of RSS over rounds, in KiB per round."""
    mean_x = sum(s.round for s in samples) / len(samples)
    mean_y = sum(s.rss_bytes for s in samples) / len(samples)
    covariance = sum((s.round - mean_x) * (s.rss_bytes - mean_y) for s in samples)
    variance = sum((s.round - mean_x) ** 2 for s in samples)
    return covariance / variance / 1024


HEADER = (
    f"{'round':>6} {'RSS MiB':>8} {'growth':>7} {'rounds/s':>8} {'CPU ms/rnd':>10} "
    f"{'threads':>7} {'fds':>4} {'ckpts':>5} {'models':>6} {'incoming':>8} {'state KiB':>9}"
)


def format_row(samples: Sequence[Sample]) -> str:
    """The table row of the newest sample (rates are over the interval since the one before)."""
    s, first = samples[-1], samples[0]
    rate = cpu = "-"
    if len(samples) > 1:
        prev = samples[-2]
        rounds = s.round - prev.round
        rate = f"{rounds / (s.seconds - prev.seconds):.1f}"
        cpu = f"{1000 * (s.cpu_seconds - prev.cpu_seconds) / rounds:.1f}"
    line = (
        f"{s.round:>6} {s.rss_bytes / MIB:>8.1f} {(s.rss_bytes - first.rss_bytes) / MIB:>+7.1f} "
        f"{rate:>8} {cpu:>10} {s.threads:>7} {s.fds:>4} {s.checkpoints:>5} "
        f"{s.global_models:>6} {s.incoming:>8} {s.state_bytes / 1024:>9.0f}"
    )
    return line if len(samples) > 1 else f"{HEADER}\n{'-' * len(HEADER)}\n{line}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="many short rounds: the coordinator's memory and state directory must not grow"
    )
    parser.add_argument("--rounds", type=int, default=1000, help="measured rounds")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10, help="round of the first sample")
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument(
        "--max-growth-mib",
        type=float,
        default=4.0,
        help="largest RSS growth from the warm-up sample on that counts as none (allocator "
        "arenas and the gRPC thread pool settle during the first few hundred rounds; the trend "
        "check is what catches a leak)",
    )
    parser.add_argument(
        "--max-slope-kib",
        type=float,
        default=1.0,
        help="largest RSS trend over the second half (KiB per round) that counts as flat",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (logs, state)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.sample_every < 1 or not 1 <= args.warmup < args.rounds:
        parser.error("need clients >= 1, sample-every >= 1 and 1 <= warmup < rounds")
    if len(sample_rounds(args.rounds, args.warmup, args.sample_every)) < 3:
        parser.error("need at least 3 samples: lower --sample-every or raise --rounds")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedlink-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    processes = Processes()
    result: dict[str, Any] | None = None
    error: str | None = None
    print(
        f"soak: {args.rounds} rounds, {args.clients} clients, model {MODEL}, mTLS on 127.0.0.1",
        flush=True,
    )
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
    failed = error is not None or result is None or not all(c["passed"] for c in result["checks"])
    if result is not None:
        print()
        for check in result["checks"]:
            print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}: {check['value']}")
    document = {
        **results_header("soak"),
        "settings": {
            "rounds": args.rounds,
            "clients": args.clients,
            "model": MODEL,
            "warmup_round": args.warmup,
            "sample_every": args.sample_every,
            "keep_checkpoints": KEEP_CHECKPOINTS,
            "evaluate_every": 0,
            "transport": "gRPC over mutual TLS on 127.0.0.1",
        },
        "elapsed_seconds": time.monotonic() - began,
        "error": error,
        "result": result,
    }
    return save_results(args, document, work, failed)


if __name__ == "__main__":
    sys.exit(main())
