"""Privacy benchmark: accuracy under differential privacy, and secure aggregation's cost.

Every part runs real federations: the accuracy of the digits demo under client-level DP-FedAvg
(the default part), under record-level DP-SGD on the clients (`--part dpsgd`), and the seconds
per round and bytes per client of secure aggregation against plaintext FedAvg (`--part cost`).

    .venv/bin/python benchmarks/privacy.py                          # epsilon 1, 3, 8 and inf
    .venv/bin/python benchmarks/privacy.py --clients 20 --rounds 20 --epsilons 8 inf
    .venv/bin/python benchmarks/privacy.py --part dpsgd --dpsgd-noise 0 1.5 3
    .venv/bin/python benchmarks/privacy.py --part cost              # 5, 10, 20 clients
    .venv/bin/python benchmarks/privacy.py --part cost --cost-clients 10 --cost-rounds 5

The cost part is described in `secagg_cost`; the primitives (mask expansion speed, in-process
protocol cost) are measured by benchmarks/privacy_core.py.

Accuracy: each row is a real federation: `fedlink demo` (a coordinator and client processes over mutual TLS
on this machine) with the dp_* settings passed to the coordinator through FEDLINK_* variables.
For a target epsilon the noise multiplier z is the smallest (found by bisection with the
coordinator's own accountant, q = 1, delta = --delta) whose epsilon after the planned rounds stays
within the target; the target is also set as dp_max_epsilon, so the coordinator checks it.
"inf" runs plain FedAvg (no clipping, no noise, sample-count weights).

Prints a table and writes JSON (default benchmarks/results/privacy.json). The update norms
reported are the median over rounds of each round's median update norm before clipping, read
from the coordinator's log, to judge the clipping norm S.

Client-level DP needs many clients: the noise on the average is z S / m per coordinate for m
clients, against a signal of at most S in norm over all d = 9,610 coordinates of the digits MLP.
With the ten or so clients one machine can run, the epsilons below cost most of the accuracy.

`--part dpsgd` measures record-level DP-SGD on the clients instead (client-level DP off): one
federation per noise multiplier z of `--dpsgd-noise` (0 = without DP-SGD), with dpsgd_max_grad_norm
--max-grad-norm. Its table has the largest epsilon any client reported after the last round
(read from the client logs, at --delta), the accuracy, and the seconds per round (median over the
rounds of metrics.jsonl's `seconds`). JSON goes to benchmarks/results/privacy-dpsgd.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# No torch (nor fedlink modules that import it) at module level: the cost part measures the
# coordinator's peak RSS, and Linux counts a parent's RSS at fork time in its child's ru_maxrss
# (see transport.py). The accuracy part imports what it needs inside its functions.
from transport import (
    Certificates,
    ModelInfo,
    Processes,
    busy_share,
    make_certificates,
    mean_cpu,
    model_info,
    results_header,
    run_fedlink,
    save_results,
    terminate_on_sigterm,
    wait_for_quiet,
)

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "privacy.json"
DEFAULT_DPSGD_OUT = BENCH_DIR / "results" / "privacy-dpsgd.json"
_DPSGD_EPSILON = re.compile(r"round (\d+): DP-SGD epsilon ([0-9.e+-]+)")
_NORM = re.compile(r"DP: clipped (\d+) of (\d+) updates to norm \S+ \(median norm ([0-9.e+-]+)\)")


def noise_for(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest z (within 0.1%) whose epsilon after `rounds` rounds at q = 1 is <= epsilon."""
    from fedlink.common.accounting import MechanismStep, PrivacyAccountant

    def spent(z: float) -> float:
        return PrivacyAccountant((MechanismStep(z, 1.0, rounds),)).epsilon(delta)

    low, high = 0.05, 1.0
    while spent(high) > epsilon:
        low, high = high, high * 2
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if spent(middle) > epsilon:
            low = middle
        else:
            high = middle
    return high


def run_demo(
    args: argparse.Namespace, run_dir: Path, settings: dict[str, str]
) -> tuple[list[dict[str, Any]], float]:
    """`fedlink demo` with coordinator `settings` as FEDLINK_* variables: (metrics rows, seconds)."""
    env = {**os.environ, **{f"FEDLINK_{name.upper()}": value for name, value in settings.items()}}
    command = [
        sys.executable,
        "-m",
        "fedlink",
        "demo",
        "--clients",
        str(args.clients),
        "--rounds",
        str(args.rounds),
        "--partition",
        args.partition,
        "--seed",
        str(args.seed),
        "--run-dir",
        str(run_dir),
    ]
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"federation with {settings} failed:\n{result.stdout}{result.stderr}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, seconds


def run_federation(args: argparse.Namespace, run_dir: Path, epsilon: float) -> dict[str, Any]:
    settings: dict[str, str] = {}
    z: float | None = None
    if math.isfinite(epsilon):
        z = noise_for(epsilon, args.rounds, args.delta)
        settings = {
            "dp_clip_norm": str(args.clip_norm),
            "dp_noise_multiplier": repr(z),
            "dp_delta": repr(args.delta),
            "dp_max_epsilon": repr(epsilon),
        }
    records, seconds = run_demo(args, run_dir, settings)
    server_log = (run_dir / "logs" / "server.log").read_text()
    norms = [float(m.group(3)) for m in _NORM.finditer(server_log)]
    clipped = sum(int(m.group(1)) for m in _NORM.finditer(server_log))
    updates = sum(int(m.group(2)) for m in _NORM.finditer(server_log))
    return {
        "target_epsilon": epsilon if math.isfinite(epsilon) else None,
        "noise_multiplier": z,
        "clip_norm": args.clip_norm if z is not None else None,
        "epsilon_spent": records[-1]["epsilon"],
        "rounds": len(records),
        "final_accuracy": records[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in records),
        "median_update_norm": statistics.median(norms) if norms else None,
        "clipped_fraction": clipped / updates if updates else None,
        "seconds": seconds,
        "run_dir": str(run_dir),
    }


def run_dpsgd(args: argparse.Namespace, run_dir: Path, z: float) -> dict[str, Any]:
    settings = {}
    if z > 0:
        settings = {
            "dpsgd_noise_multiplier": repr(z),
            "dpsgd_max_grad_norm": repr(args.max_grad_norm),
            "dpsgd_delta": repr(args.delta),
        }
    records, seconds = run_demo(args, run_dir, settings)
    epsilons = []  # each client's last reported epsilon
    for log in sorted((run_dir / "logs").glob("client-*.log")):
        reported = _DPSGD_EPSILON.findall(log.read_text())
        if reported:
            epsilons.append(float(reported[-1][1]))
    if z > 0 and len(epsilons) != args.clients:
        raise SystemExit(f"only {len(epsilons)} of {args.clients} clients reported an epsilon")
    return {
        "noise_multiplier": z if z > 0 else None,
        "max_grad_norm": args.max_grad_norm if z > 0 else None,
        "max_client_epsilon": max(epsilons) if epsilons else None,
        "min_client_epsilon": min(epsilons) if epsilons else None,
        "rounds": len(records),
        "final_accuracy": records[-1]["test_accuracy"],
        "best_accuracy": max(r["test_accuracy"] for r in records),
        "seconds_per_round": statistics.median(r["seconds"] for r in records),
        "seconds": seconds,
        "run_dir": str(run_dir),
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# ---- secure aggregation's cost against plaintext ---------------------------------------------

COST_OUT = BENCH_DIR / "results" / "privacy_cost.json"
COST_MODEL = "cnn1.66m"
COST_CLIENTS = (5, 10, 20)
COST_ROUNDS = 3
RINGS = (64, 32)
# The coordinator's default bound on every weight's magnitude, passed explicitly so that the
# fixed-point precision reported is the one the federation used.
VALUE_BOUND = 100.0
TARGET_CLIENTS = 10
TARGET_BYTES_RATIO = 2.0
TARGET_SECONDS_RATIO = 3.0
MB = 1e6
MIB = 1 << 20
# Log lines that mark the steps of a round (text log format, "%(asctime)s %(levelname)-7s
# %(name)s: ..."): the coordinator's debug line for every accepted result and its line once the
# sum is unmasked (server/rounds.py); a client's line after training and once its answer to a
# secure step is ready to upload (client/app.py).
_STAMP = r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) "
_ACCEPTED = re.compile(
    _STAMP + r"DEBUG\s+\S+: accepted (\S+) result from \S+ \(round (\d+)\)$", re.MULTILINE
)
_RECOVERED = re.compile(
    _STAMP + r"INFO\s+\S+: round (\d+): secure aggregation recovered", re.MULTILINE
)
_CLIENT = re.compile(
    _STAMP + r"INFO\s+\S+: round (\d+): (trained|secagg_advertise|secagg_masked_input) ",
    re.MULTILINE,
)
_FAILED_ATTEMPT = re.compile(r"round \d+: (secure aggregation failed|repeating the round)")
# Each step of a round ends at the last of its marks across all clients: (step, mark). A
# client's "ready" mark is its answer computed; the step after it is the upload and the
# coordinator's check of the last answer. The secure round's "server unmask" is
# SecAggServer.result (the survivors' self masks removed, the dropped clients' pairwise masks
# re-derived); "decode+write" the new global model decoded, written and checkpointed.
PLAIN_STEPS = (
    ("download+train", "client trained"),
    ("upload", "accepted train"),
    ("aggregate+write", "end"),
)
SECURE_STEPS = (
    ("download+train", "client trained"),
    ("encode+keys", "client secagg_advertise"),
    ("upload keys", "accepted secagg-advertise"),
    ("share keys", "accepted secagg-share-keys"),
    ("mask", "client secagg_masked_input"),
    ("upload masked", "accepted secagg-masked-input"),
    ("unmask shares", "accepted secagg-unmask"),
    ("server unmask", "server recovered"),
    ("decode+write", "end"),
)


def log_time(stamp: str) -> float:
    """A text-format log timestamp (local time, milliseconds) as seconds since the epoch."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def step_seconds(
    server_log: str,
    client_logs: Sequence[str],
    round_ends: Sequence[float],
    round_seconds: Sequence[float],
    secure: bool,
) -> list[dict[str, float]]:
    """Per round, the seconds of each step (PLAIN_STEPS or SECURE_STEPS), from the log lines and
    the time each round's metrics row appeared (its start is that minus the round's `seconds`).
    A retried round's steps are those of its last attempt, the failed attempts counted in its
    first step."""
    last: dict[tuple[int, str], float] = {}

    def mark(round_number: str, name: str, stamp: str) -> None:
        key = (int(round_number), name)
        last[key] = max(last.get(key, 0.0), log_time(stamp))

    for match in _ACCEPTED.finditer(server_log):
        mark(match.group(3), f"accepted {match.group(2)}", match.group(1))
    for match in _RECOVERED.finditer(server_log):
        mark(match.group(2), "server recovered", match.group(1))
    for log in client_logs:
        for match in _CLIENT.finditer(log):
            mark(match.group(2), f"client {match.group(3)}", match.group(1))
    steps = SECURE_STEPS if secure else PLAIN_STEPS
    out: list[dict[str, float]] = []
    # A round whose row the driver saw too late (the coordinator had exited) has no end time.
    for index, (end, seconds) in enumerate(zip(round_ends, round_seconds, strict=False)):
        marks = [last.get((index + 1, name)) for _, name in steps[:-1]]
        times = [end - seconds, *(m for m in marks if m is not None), end]
        if len(times) != len(steps) + 1:
            out.append({})
            continue
        out.append(
            {name: b - a for (name, _), a, b in zip(steps, times[:-1], times[1:], strict=True)}
        )
    return out


@dataclass(frozen=True)
class Mode:
    """Plaintext FedAvg (ring_bits None) or secure aggregation over Z_2^ring_bits."""

    ring_bits: int | None

    @property
    def name(self) -> str:
        return "plaintext" if self.ring_bits is None else f"secagg ring {self.ring_bits}"

    def server_args(self, info: ModelInfo) -> list[str]:
        if self.ring_bits is None:
            return []
        # W = the noop clients' sample count: each client encodes its model with weight 1, the
        # finest fixed-point grid the no-wrap bound allows.
        return [
            "--secure-aggregation",
            "--secagg-ring-bits",
            str(self.ring_bits),
            "--secagg-max-weight",
            str(info.num_examples),
            "--secagg-value-bound",
            str(VALUE_BOUND),
        ]


def cost_case(
    info: ModelInfo,
    mode: Mode,
    num_clients: int,
    rounds: int,
    certs: Certificates,
    work: Path,
    timeout: float,
) -> dict[str, Any]:
    """One federation of noop clients in `mode`; its per-round seconds, bytes and steps."""
    processes = Processes()
    try:
        run = run_fedlink(
            info,
            num_clients,
            rounds,
            certs,
            work,
            timeout,
            processes,
            verbose=True,  # the coordinator's per-result debug lines delimit the steps
            server_args=mode.server_args(info),
            check_bytes=mode.ring_bits is None,
        )
    finally:
        processes.kill_all()
    logs = work / "logs"
    server_log = (logs / "server.log").read_text(errors="replace")
    client_logs = [path.read_text(errors="replace") for path in logs.glob("client-*.log")]
    steps = step_seconds(
        server_log,
        client_logs,
        run.round_ended_at,
        run.round_seconds,
        secure=mode.ring_bits is not None,
    )
    later = run.round_seconds[1:] or run.round_seconds
    round_cpu = mean_cpu(run.round_cpu) if run.round_cpu else None
    median_seconds = statistics.median(later) if later else None
    measured_steps = [s for s in steps[1:] if s]
    return {
        "mode": mode.name,
        "ring_bits": mode.ring_bits,
        "clients": num_clients,
        "rounds": rounds,
        "error": run.error,
        "failed_attempts": len(_FAILED_ATTEMPT.findall(server_log)),
        "round_seconds": run.round_seconds,
        "median_round_seconds": median_seconds,
        "down_bytes_per_client": [d / num_clients for d in run.bytes_down],
        "up_bytes_per_client": [u / num_clients for u in run.bytes_up],
        "server_peak_rss_bytes": run.server_peak_rss_bytes or None,
        "server_vmhwm_bytes": run.server_vmhwm_bytes or None,
        "client_peak_rss_bytes": run.client_peak_rss_bytes or None,
        "system_peak_used_bytes": run.system_peak_used_bytes,
        "round_cpu_seconds": dataclasses.asdict(round_cpu) if round_cpu else None,
        # Share of the machine's CPU other processes used during rounds 2.. (0 = quiet).
        "interference": busy_share(round_cpu, statistics.fmean(later) if later else None),
        "step_seconds": steps,
        "median_step_seconds": {
            name: statistics.median(s[name] for s in measured_steps) for name in measured_steps[0]
        }
        if measured_steps
        else None,
        "wall_seconds": run.wall_seconds,
    }


def add_encoding(rows: list[dict[str, Any]]) -> None:
    """Each secure row's fixed-point precision and the documented bound on its distance to
    plaintext FedAvg (every client has weight w = W, so the weight fractions sum to n).
    Imported only now: fixedpoint imports torch (see the note on imports)."""
    from fedlink.common.fixedpoint import FixedPoint

    for row in rows:
        if row["ring_bits"] is None:
            continue
        n = row["clients"]
        encoding = FixedPoint.for_sum(
            num_clients=n, value_bound=VALUE_BOUND, ring_bits=row["ring_bits"]
        )
        row["frac_bits"] = encoding.frac_bits
        row["average_error_bound"] = encoding.average_error_bound(n, float(n))


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row against the plaintext row with the same number of clients."""
    plain = {r["clients"]: r for r in rows if r["ring_bits"] is None}
    for row in rows:
        base = plain.get(row["clients"])
        row["down_mb"] = median_or_none(row["down_bytes_per_client"], MB)
        row["up_mb"] = median_or_none(row["up_bytes_per_client"], MB)
        row["seconds_ratio"] = row["bytes_ratio"] = row["up_ratio"] = row["cpu_ratio"] = None
        if base is None or row["down_mb"] is None or base["down_mb"] is None:
            continue
        row["bytes_ratio"] = (row["down_mb"] + row["up_mb"]) / (base["down_mb"] + base["up_mb"])
        row["up_ratio"] = row["up_mb"] / base["up_mb"]
        if row["median_round_seconds"] and base["median_round_seconds"]:
            row["seconds_ratio"] = row["median_round_seconds"] / base["median_round_seconds"]
        # CPU seconds move less than wall seconds when other processes share the machine.
        cpu, base_cpu = cpu_seconds(row), cpu_seconds(base)
        if cpu and base_cpu:
            row["cpu_ratio"] = cpu / base_cpu


def cpu_seconds(row: dict[str, Any]) -> float | None:
    """CPU seconds per round of the coordinator and all clients together (mean after round 1)."""
    cpu = row["round_cpu_seconds"]
    return None if cpu is None else sum(v for k, v in cpu.items() if k != "other")


def median_or_none(values: Sequence[float], unit: float) -> float | None:
    return statistics.median(values) / unit if values else None


def cost_checks(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at TARGET_CLIENTS clients, for every secure row run."""
    out: list[dict[str, Any]] = []
    for row in rows:
        if row["clients"] != TARGET_CLIENTS or row["ring_bits"] is None:
            continue
        for name, key, target in (
            ("bytes per client (down + up)", "bytes_ratio", TARGET_BYTES_RATIO),
            ("upload per client", "up_ratio", TARGET_BYTES_RATIO),
            ("seconds per round", "seconds_ratio", TARGET_SECONDS_RATIO),
        ):
            value = row[key]
            out.append(
                {
                    "check": f"{row['mode']}, {TARGET_CLIENTS} clients: {name} <= "
                    f"{target:g} x plaintext",
                    "value": value,
                    "passed": value is not None and value <= target,
                }
            )
    return out


def format_cost_table(rows: list[dict[str, Any]]) -> str:
    header = (
        f"{'clients':>7} {'mode':<14} {'f':>3} {'err bound':>9} {'round s':>7} {'x plain':>7} "
        f"{'down MB':>7} {'up MB':>7} {'bytes x':>7} {'up x':>6} {'srv MiB':>7} "
        f"{'srv CPU s':>9} {'cl CPU s':>8} {'CPU x':>5} {'sys GiB':>7} {'noise %':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        cpu = row["round_cpu_seconds"]
        peak = row["server_peak_rss_bytes"]
        lines.append(
            f"{row['clients']:>7} {row['mode']:<14} {_cell(row.get('frac_bits'), 'd'):>3} "
            f"{_cell(row.get('average_error_bound'), '.1e'):>9} "
            f"{_cell(row['median_round_seconds'], '.2f'):>7} {_cell(row['seconds_ratio'], '.2f'):>7} "
            f"{_cell(row['down_mb'], '.3f'):>7} {_cell(row['up_mb'], '.3f'):>7} "
            f"{_cell(row['bytes_ratio'], '.4f'):>7} {_cell(row['up_ratio'], '.4f'):>6} "
            f"{_cell(peak / MIB if peak else None, '.0f'):>7} "
            f"{_cell(cpu['server_user'] + cpu['server_sys'] if cpu else None, '.2f'):>9} "
            f"{_cell(cpu['clients_user'] + cpu['clients_sys'] if cpu else None, '.2f'):>8} "
            f"{_cell(row['cpu_ratio'], '.2f'):>5} {row['system_peak_used_bytes'] / (1 << 30):>7.1f} "
            f"{_cell(100 * row['interference'] if row['interference'] is not None else None, '.0f'):>7}"
            + (f"  FAILED: {row['error']}" if row["error"] else "")
        )
    return "\n".join(lines)


def format_steps(rows: list[dict[str, Any]]) -> str:
    """Median seconds of each step (rounds after the first), one line per federation."""
    lines = []
    for row in rows:
        steps = row["median_step_seconds"]
        if steps:
            cells = ", ".join(f"{name} {seconds:.2f}" for name, seconds in steps.items())
            lines.append(f"{row['clients']:>3} clients, {row['mode']:<14} {cells}")
    return "\n".join(lines)


def secagg_cost(args: argparse.Namespace) -> int:
    """Secure aggregation's cost against plaintext FedAvg, in real federations.

    For each number of clients: plaintext FedAvg, then secure aggregation with a 64-bit and a
    32-bit ring, each a real coordinator and N client processes over mutual TLS on this machine
    (transport.run_fedlink) with the 1.66M-parameter CNN and training replaced by a no-op
    (benchmarks/noop_task.py), so what differs is transport plus secure aggregation: key
    agreement, Shamir sharing, encoding and masking on the clients, three more task round trips,
    unmasking and decoding on the coordinator. Per federation: the median round seconds after
    round 1, the payload bytes each client downloads and uploads per round (metrics.jsonl;
    payload bytes, not gRPC framing), the coordinator's peak RSS and CPU per round, and the
    seconds of each step from the coordinator's and the clients' logs.
    """
    if min(args.cost_clients) < 3 or args.cost_rounds < 1:
        # The coordinator refuses secure aggregation with fewer than 3 clients (config.py).
        raise SystemExit("--cost-clients must be at least 3 and --cost-rounds at least 1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="fedlink-privacy-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    modes = [Mode(None), *(Mode(bits) for bits in args.rings)]
    rows: list[dict[str, Any]] = []
    failed = False
    with terminate_on_sigterm():
        try:
            info, torch_version = model_info(COST_MODEL)
            certs = make_certificates(work / "certs", max(args.cost_clients))
            print(
                f"{info.name}: {info.parameters:,} parameters, {info.payload_bytes:,} bytes as "
                f"safetensors; {args.cost_rounds} rounds per federation, noop training",
                flush=True,
            )
            for num_clients in args.cost_clients:
                for mode in modes:
                    wait_for_quiet(args.quiet_wait)
                    print(f"  {num_clients} clients, {mode.name} ...", flush=True)
                    row = cost_case(
                        info,
                        mode,
                        num_clients,
                        args.cost_rounds,
                        certs,
                        work / f"{num_clients}-{mode.name.replace(' ', '-')}",
                        args.timeout,
                    )
                    seconds = ", ".join(f"{s:.2f}" for s in row["round_seconds"])
                    print(f"    {row['error'] or 'rounds (s): ' + seconds}", flush=True)
                    failed = failed or bool(row["error"] or row["failed_attempts"])
                    rows.append(row)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            failed = True
    if not rows:
        print(f"no federation finished; work directory kept: {work}", file=sys.stderr)
        return 1
    header = results_header("privacy (secure-aggregation cost)")  # before torch is imported
    add_encoding(rows)
    add_ratios(rows)
    print()
    print(format_cost_table(rows))
    print("\nmedian seconds per step (rounds after the first):")
    print(format_steps(rows))
    checks = cost_checks(rows)
    if checks:
        print()
    for check in checks:
        value = "-" if check["value"] is None else f"{check['value']:.4f}"
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}: {value}")
    document = {
        **header,
        "settings": {
            "model": info.name,
            "clients": args.cost_clients,
            "rounds": args.cost_rounds,
            "rings": args.rings,
            "secagg_value_bound": VALUE_BOUND,
            "transport": "gRPC over mutual TLS on 127.0.0.1, noop training",
            "median_round_seconds": "median of metrics.jsonl 'seconds' after round 1",
            "bytes": "payload bytes per client per round (metrics.jsonl), median over rounds",
            "ratios": "against the plaintext federation with the same number of clients",
            "torch": torch_version,
        },
        "results": rows,
        "checks": checks,
    }
    return save_results(args, document, work, failed)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part",
        choices=("accuracy", "dpsgd", "cost"),
        default="accuracy",
        help="accuracy under client-level DP (the default) or record-level DP-SGD, or secure "
        "aggregation's cost against plaintext",
    )
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument(
        "--dpsgd-noise",
        nargs="+",
        type=float,
        default=[0.0, 1.5, 3.0],
        metavar="Z",
        help="--part dpsgd: one run per DP-SGD noise multiplier (0 = without DP-SGD)",
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD's C")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "bench-privacy")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"default {DEFAULT_OUT}, for --part dpsgd {DEFAULT_DPSGD_OUT}, for --part cost {COST_OUT}",
    )
    cost = parser.add_argument_group("--part cost")
    cost.add_argument("--cost-clients", type=int, nargs="+", default=list(COST_CLIENTS))
    cost.add_argument("--cost-rounds", type=int, default=COST_ROUNDS, help="the first is a warm-up")
    cost.add_argument("--rings", type=int, nargs="+", default=list(RINGS), choices=RINGS)
    cost.add_argument("--timeout", type=float, default=900.0, help="seconds per federation")
    cost.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="before each federation, wait up to this long for other processes to go quiet",
    )
    cost.add_argument("--work-dir", type=Path, default=None, help="default: a temp dir")
    cost.add_argument("--keep", action="store_true", help="keep the work dir (logs, run dirs)")
    args = parser.parse_args()
    if args.part == "cost":
        args.out = args.out or COST_OUT
        return secagg_cost(args)
    if args.part == "dpsgd":
        rows = dpsgd_table(args)
        out = args.out or DEFAULT_DPSGD_OUT
        name, key = "privacy (DP-SGD accuracy)", "dpsgd"
    else:
        rows = client_level_table(args)
        out = args.out or DEFAULT_OUT
        name, key = "privacy (DP accuracy)", "accuracy"

    document = {
        "benchmark": name,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": importlib.metadata.version("torch"),
            "cpus": os.cpu_count(),
        },
        "settings": {
            "task": "digits",
            "clients": args.clients,
            "rounds": args.rounds,
            "partition": args.partition,
            "clip_norm": args.clip_norm if args.part == "accuracy" else None,
            "max_grad_norm": args.max_grad_norm if args.part == "dpsgd" else None,
            "delta": args.delta,
            "sample_rate": 1.0
            if args.part == "accuracy"
            else "1 / ceil(N / batch_size) per client",
            "seed": args.seed,
        },
        key: rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")
    return 0


def client_level_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    print(
        f"digits demo, {args.clients} clients ({args.partition}), {args.rounds} rounds, "
        f"S = {args.clip_norm}, delta = {args.delta}, q = 1; real federations over mTLS"
    )
    header = (
        f"{'target eps':>10} {'z':>7} {'eps spent':>9} {'rounds':>6} {'final acc':>9} "
        f"{'best acc':>8} {'median norm':>11} {'clipped':>7} {'seconds':>7}"
    )
    print(header)
    for epsilon in args.epsilons:
        row = run_federation(args, args.runs_dir / f"eps-{epsilon:g}", epsilon)
        rows.append(row)
        print(
            f"{epsilon:>10g} {_cell(row['noise_multiplier'], '.3f'):>7} "
            f"{_cell(row['epsilon_spent'], '.3f'):>9} {row['rounds']:>6} "
            f"{row['final_accuracy']:>9.4f} {row['best_accuracy']:>8.4f} "
            f"{_cell(row['median_update_norm'], '.3f'):>11} "
            f"{_cell(row['clipped_fraction'], '.2f'):>7} {row['seconds']:>7.1f}",
            flush=True,
        )
    return rows


def dpsgd_table(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    print(
        f"digits demo with record-level DP-SGD, {args.clients} clients ({args.partition}), "
        f"{args.rounds} rounds, C = {args.max_grad_norm}, delta = {args.delta}; real "
        "federations over mTLS"
    )
    print(
        f"{'z':>5} {'max client eps':>14} {'rounds':>6} {'final acc':>9} {'best acc':>8} "
        f"{'s/round':>7} {'seconds':>7}"
    )
    for z in args.dpsgd_noise:
        row = run_dpsgd(args, args.runs_dir / f"dpsgd-z-{z:g}", z)
        rows.append(row)
        print(
            f"{_cell(row['noise_multiplier'], 'g'):>5} "
            f"{_cell(row['max_client_epsilon'], '.3f'):>14} {row['rounds']:>6} "
            f"{row['final_accuracy']:>9.4f} {row['best_accuracy']:>8.4f} "
            f"{row['seconds_per_round']:>7.2f} {row['seconds']:>7.1f}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
