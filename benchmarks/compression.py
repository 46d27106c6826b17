"""Update compression benchmark: upload bytes per round and final accuracy of each update codec.

    .venv/bin/python benchmarks/compression.py                          # Fashion-MNIST, 5 rounds
    .venv/bin/python benchmarks/compression.py --task digits --rounds 10 --partitions 2

Each codec runs a whole federation the way it runs across sites: `fedlink server` and client
processes over mutual TLS on 127.0.0.1, same seeds and same local work, only `update_codec` /
`update_topk` differ. Upload bytes are the coordinator's own count of the payload bytes it
received in a round (metrics.jsonl `bytes_up`), divided by the number of clients; accuracy is
the coordinator's centralized test accuracy after the last round. The default task is the
built-in `fashion-mnist` (real Fashion-MNIST from Debian's dataset-fashion-mnist package, the
FedAvg CNN with 1.66M parameters); 2 clients hold 2 of `--partitions` IID parts of the 60,000
training images, so a round costs minutes of CPU, not hours.

Prints a Markdown table and writes JSON (default benchmarks/results/compression.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from federation_runs import issue_certificates, run_federation

CODECS: dict[str, dict[str, object]] = {
    "fp32": {"update_codec": "fp32"},
    "fp16": {"update_codec": "fp16"},
    "bf16": {"update_codec": "bf16"},
    "int8": {"update_codec": "int8"},
    "int8 top-10%": {"update_codec": "int8", "update_topk": 0.1},
}
CLIENTS = 2


def _federation(
    args: argparse.Namespace, certs: Path, run: Path, settings: dict[str, object]
) -> list[dict[str, Any]]:
    server = {
        "task": args.task,
        "num_rounds": args.rounds,
        "local_epochs": 1,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "evaluate_every": 0,
        **settings,
    }
    client = {"task": args.task, "num_partitions": args.partitions, "seed": args.seed}
    return run_federation(certs, run, clients=CLIENTS, server=server, client=client)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="fashion-mnist")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--partitions", type=int, default=10, help="IID parts; 2 clients hold 2")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated subset")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/compression.json"))
    args = parser.parse_args()
    chosen = args.codecs.split(",")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="fedlink-compression-") as scratch:
        certs = Path(scratch) / "certs"
        issue_certificates(certs, CLIENTS)
        for number, label in enumerate(chosen):
            started = time.monotonic()
            records = _federation(args, certs, Path(scratch) / f"run-{number}", CODECS[label])
            upload = sum(r["bytes_up"] for r in records) / len(records) / CLIENTS
            results[label] = {
                "upload_bytes_per_client_round": upload,
                "final_test_accuracy": records[-1]["test_accuracy"],
                "seconds": time.monotonic() - started,
            }
            print(f"{label}: {results[label]}", file=sys.stderr, flush=True)
    base = results.get("fp32")
    print(f"\n{args.task}, {CLIENTS} clients on {CLIENTS} of {args.partitions} IID parts, ", end="")
    print(f"{args.rounds} rounds, seed {args.seed}\n")
    print("| codec | upload bytes per client and round | vs fp32 | final test accuracy | vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    for label, result in results.items():
        upload, accuracy = result["upload_bytes_per_client_round"], result["final_test_accuracy"]
        ratio = f"{100 * upload / base['upload_bytes_per_client_round']:.1f}%" if base else "-"
        points = f"{100 * (accuracy - base['final_test_accuracy']):+.2f} pt" if base else "-"
        print(f"| {label} | {upload:,.0f} | {ratio} | {100 * accuracy:.2f}% | {points} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {"arguments": vars(args) | {"output": str(args.output)}, "results": results}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
