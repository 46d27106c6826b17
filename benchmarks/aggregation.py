"""Aggregation cost: seconds and peak memory of each rule for n memory-mapped updates.

    .venv/bin/python benchmarks/aggregation.py                       # 10M parameters, n = 10, 30
    .venv/bin/python benchmarks/aggregation.py --params 100000000 --clients 10

Writes a float32 global model of `--params` parameters (ten equal tensors and an int64 counter)
and n updates as safetensors files, then, for each rule, starts a fresh process that memory-maps
them with `open_state_file`, as the coordinator does, and times `rule.aggregate`. Memory is the
peak of the process's anonymous resident memory (RssAnon, sampled every 2 ms) above its level
before aggregating; it includes the result (one model). Pages of the mapped update files are
page cache, reclaimable by the kernel, and are not counted.

Prints a table and writes JSON (default benchmarks/results/aggregation.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fedlink.common.tensors import manifest_of, open_state_file, save_state_file
from fedlink.server.robust import parse_rule

RULES = [
    "fedavg",
    "fedavg,clip=median",
    "median",
    "trimmed-mean,beta=0.3",
    "krum,f=3",
    "multi-krum,f=3",
]


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def write_models(directory: Path, params: int, clients: int) -> None:
    generator = torch.Generator().manual_seed(0)
    size = params // 10
    base = {f"layer{i}.weight": torch.randn(size, generator=generator) for i in range(10)}
    base["steps"] = torch.tensor(0)
    save_state_file(base, directory / "global.safetensors", durable=False)
    for client in range(clients):
        update = {
            n: t + 0.01 * torch.randn(t.shape, generator=generator)
            for n, t in base.items()
            if t.is_floating_point()
        }
        update["steps"] = torch.tensor(client)
        save_state_file(update, directory / f"update-{client}.safetensors", durable=False)
        del update


def measure(directory: Path, spec: str, clients: int) -> dict[str, float]:
    """Runs in the child process: aggregate once, report seconds and peak anonymous memory."""
    torch.set_num_threads(1)
    rule = parse_rule(spec)
    with ExitStack() as stack:
        global_state = stack.enter_context(open_state_file(directory / "global.safetensors"))
        updates = [
            (1.0, stack.enter_context(open_state_file(directory / f"update-{i}.safetensors")))
            for i in range(clients)
        ]
        manifest = manifest_of(global_state)
        before = rss_anon()
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.002):
                peak = max(peak, rss_anon())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            started = time.perf_counter()
            result = rule.aggregate(global_state, updates, manifest)
            seconds = time.perf_counter() - started
            peak = max(peak, rss_anon())
        finally:
            done.set()
            sampler.join()
        del result
    return {"seconds": seconds, "peak_extra_bytes": float(peak - before)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--clients", default="10,30", help="comma-separated numbers of updates")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/aggregation.json"))
    parser.add_argument("--child", nargs=3, metavar=("DIR", "RULE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        directory, spec, clients = args.child
        print(json.dumps(measure(Path(directory), spec, int(clients))))
        return 0
    model_mib = args.params * 4 / 2**20
    rows: list[dict[str, Any]] = []
    for clients in (int(c) for c in args.clients.split(",")):
        with tempfile.TemporaryDirectory(prefix="fedlink-aggregation-") as tmp:
            write_models(Path(tmp), args.params, clients)
            for spec in RULES:
                if parse_rule(spec).min_updates > clients:
                    continue
                child = subprocess.run(
                    [sys.executable, __file__, "--child", tmp, spec, str(clients)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                row = {
                    "rule": spec,
                    "clients": clients,
                    **json.loads(child.stdout.splitlines()[-1]),
                }
                rows.append(row)
                print(
                    f"n={clients:>3} {spec:<22} {row['seconds']:8.2f} s "
                    f"{row['peak_extra_bytes'] / 2**20:8.0f} MiB",
                    flush=True,
                )
    print(f"\nmodel: {args.params:,} float32 parameters ({model_mib:.0f} MiB); 1 torch thread")
    print("| rule | n | seconds | peak memory above baseline (MiB) | in models |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        extra = row["peak_extra_bytes"] / 2**20
        print(
            f"| `{row['rule']}` | {row['clients']} | {row['seconds']:.2f} | {extra:.0f} | "
            f"{extra / model_mib:.2f} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "aggregation",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "params": args.params,
        "environment": {"python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
