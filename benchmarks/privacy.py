"""Privacy benchmark, part 2: accuracy of the digits demo under differential privacy.

    .venv/bin/python benchmarks/privacy.py                          # epsilon 1, 3, 8 and inf
    .venv/bin/python benchmarks/privacy.py --clients 20 --rounds 20 --epsilons 8 inf
    .venv/bin/python benchmarks/privacy.py --dpsgd 0 1.5 3          # record-level DP-SGD instead

Each row is a real federation: `fedlink demo` (a coordinator and client processes over mutual TLS
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

`--dpsgd Z [Z ...]` measures record-level DP-SGD on the clients instead (client-level DP off):
one federation per noise multiplier z (0 = without DP-SGD), with dpsgd_max_grad_norm
--max-grad-norm. Its table has the largest epsilon any client reported after the last round
(read from the client logs, at --delta), the accuracy, and the seconds per round (median over the
rounds of metrics.jsonl's `seconds`). JSON goes to benchmarks/results/privacy-dpsgd.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fedlink.common.accounting import MechanismStep, PrivacyAccountant

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "privacy.json"
DEFAULT_DPSGD_OUT = BENCH_DIR / "results" / "privacy-dpsgd.json"
_DPSGD_EPSILON = re.compile(r"round (\d+): DP-SGD epsilon ([0-9.e+-]+)")
_NORM = re.compile(r"DP: clipped (\d+) of (\d+) updates to norm \S+ \(median norm ([0-9.e+-]+)\)")


def noise_for(epsilon: float, rounds: int, delta: float) -> float:
    """The smallest z (within 0.1%) whose epsilon after `rounds` rounds at q = 1 is <= epsilon."""

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument(
        "--dpsgd",
        nargs="+",
        type=float,
        metavar="Z",
        help="record-level DP-SGD table instead: one run per noise multiplier (0 = without)",
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="DP-SGD's C")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "bench-privacy")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.dpsgd is not None:
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
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
        "settings": {
            "task": "digits",
            "clients": args.clients,
            "rounds": args.rounds,
            "partition": args.partition,
            "clip_norm": args.clip_norm if args.dpsgd is None else None,
            "max_grad_norm": args.max_grad_norm if args.dpsgd is not None else None,
            "delta": args.delta,
            "sample_rate": 1.0 if args.dpsgd is None else "1 / ceil(N / batch_size) per client",
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
    for z in args.dpsgd:
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
