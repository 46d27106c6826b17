"""Federated transfer learning: a new head on a pretrained backbone against the same network
trained federatedly from scratch, same clients, rounds and local work.

    .venv/bin/python -m fedlink.common.tasks.digits_transfer --out backbone.safetensors
    .venv/bin/python benchmarks/transfer.py --backbone backbone.safetensors

The backbone is pretrained centrally on Fashion-MNIST (first command). Each run is a whole
federation of the built-in `digits-transfer` task the way it runs across sites: `fedlink server`
and `--clients` client processes over mutual TLS on 127.0.0.1, each client holding one IID part of
the digits' training split:

- "head on pretrained backbone": every process loads the backbone (FEDLINK_TRANSFER_BACKBONE),
  `exchanged_tensors = ["head.*"]`: only the head trains and travels;
- "from scratch": no backbone file, every tensor trains and travels;
- "all tensors from pretrained": the backbone file and every tensor exchanged (fine-tuning all).

Bytes are the coordinator's own count of what it sent and received in a round (metrics.jsonl
`bytes_down`, `bytes_up`, which include the evaluation round trip); accuracy is its test accuracy
on the digits' 360 test images after the last round. Prints a Markdown table and writes JSON
(default benchmarks/results/transfer.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from federation_runs import issue_certificates, process_env, run_federation

from fedlink.common.tasks.digits_transfer import BACKBONE_ENV

RUNS: dict[str, tuple[bool, dict[str, object]]] = {  # (loads the backbone, server settings)
    "head on pretrained backbone": (True, {"exchanged_tensors": "head.*"}),
    "from scratch": (False, {}),
    "all tensors from pretrained": (True, {}),
}


def _federation(
    args: argparse.Namespace, certs: Path, run: Path, backbone: bool, settings: dict[str, object]
) -> list[dict[str, Any]]:
    env = process_env()
    env.pop(BACKBONE_ENV, None)
    if backbone:
        env[BACKBONE_ENV] = str(args.backbone.resolve())
    server = {
        "task": "digits-transfer",
        "num_rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        **settings,
    }
    client = {"task": "digits-transfer", "num_partitions": args.clients, "seed": args.seed}
    return run_federation(certs, run, clients=args.clients, server=server, client=client, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", type=Path, required=True, help="the pretrained backbone")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/transfer.json"))
    args = parser.parse_args()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedlink-transfer-") as scratch:
        certs = Path(scratch) / "certs"
        issue_certificates(certs, args.clients)
        for number, label in enumerate(args.runs.split(",")):
            backbone, settings = RUNS[label]
            started = time.monotonic()
            records = _federation(args, certs, Path(scratch) / f"run-{number}", backbone, settings)
            results[label] = {
                "accuracy_by_round": [r["test_accuracy"] for r in records],
                "bytes_up_per_round": sum(r["bytes_up"] for r in records) / len(records),
                "bytes_down_per_round": sum(r["bytes_down"] for r in records) / len(records),
                "seconds": time.monotonic() - started,
            }
            print(f"{label}: {results[label]}", file=sys.stderr, flush=True)
    print(
        f"\ndigits-transfer, {args.clients} clients (IID parts), {args.rounds} rounds of ", end=""
    )
    print(
        f"{args.local_epochs} local epoch(s), learning rate {args.learning_rate}, seed {args.seed}\n"
    )
    print("| run | test accuracy by round | final | bytes up per round | bytes down per round |")
    print("|---|---|---:|---:|---:|")
    for label, result in results.items():
        curve = " ".join(f"{a:.3f}" for a in result["accuracy_by_round"])
        print(
            f"| {label} | {curve} | {100 * result['accuracy_by_round'][-1]:.2f}% | "
            f"{result['bytes_up_per_round']:,.0f} | {result['bytes_down_per_round']:,.0f} |"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    arguments = {key: str(value) for key, value in vars(args).items()}
    args.output.write_text(json.dumps({"arguments": arguments, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
