"""Privacy benchmark, part 2: accuracy of the digits demo under client-level DP-FedAvg.

    .venv/bin/python benchmarks/privacy.py                          # epsilon 1, 3, 8 and inf
    .venv/bin/python benchmarks/privacy.py --clients 20 --rounds 20 --epsilons 8 inf

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


def run_federation(args: argparse.Namespace, run_dir: Path, epsilon: float) -> dict[str, Any]:
    env = {**os.environ}
    z: float | None = None
    if math.isfinite(epsilon):
        z = noise_for(epsilon, args.rounds, args.delta)
        env.update(
            FEDLINK_DP_CLIP_NORM=str(args.clip_norm),
            FEDLINK_DP_NOISE_MULTIPLIER=repr(z),
            FEDLINK_DP_DELTA=repr(args.delta),
            FEDLINK_DP_MAX_EPSILON=repr(epsilon),
        )
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
        raise SystemExit(
            f"federation for epsilon={epsilon} failed:\n{result.stdout}{result.stderr}"
        )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1.0, 3.0, 8.0, math.inf])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--partition", default="iid")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs") / "bench-privacy")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

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

        def cell(value: float | None, fmt: str) -> str:
            return "-" if value is None else format(value, fmt)

        print(
            f"{epsilon:>10g} {cell(row['noise_multiplier'], '.3f'):>7} "
            f"{cell(row['epsilon_spent'], '.3f'):>9} {row['rounds']:>6} "
            f"{row['final_accuracy']:>9.4f} {row['best_accuracy']:>8.4f} "
            f"{cell(row['median_update_norm'], '.3f'):>11} {cell(row['clipped_fraction'], '.2f'):>7} "
            f"{row['seconds']:>7.1f}",
            flush=True,
        )

    document = {
        "benchmark": "privacy (DP accuracy)",
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
            "clip_norm": args.clip_norm,
            "delta": args.delta,
            "sample_rate": 1.0,
            "seed": args.seed,
        },
        "accuracy": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
