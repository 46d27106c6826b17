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
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from fedlink.common.pki import init_ca, issue_certificate
from fedlink.common.tasks.digits_transfer import BACKBONE_ENV

RUNS: dict[str, tuple[bool, dict[str, object]]] = {  # (loads the backbone, server settings)
    "head on pretrained backbone": (True, {"exchanged_tensors": "head.*"}),
    "from scratch": (False, {}),
    "all tensors from pretrained": (True, {}),
}


def _flags(**values: object) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]


def _spawn(arguments: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    out: IO[bytes] = open(log, "wb")  # noqa: SIM115 (owned by the child process)
    return subprocess.Popen(
        [sys.executable, "-m", "fedlink", *arguments], stdout=out, stderr=out, env=env
    )


def _federation(
    args: argparse.Namespace, certs: Path, run: Path, backbone: bool, settings: dict[str, object]
) -> list[dict[str, Any]]:
    run.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop(BACKBONE_ENV, None)
    if backbone:
        env[BACKBONE_ENV] = str(args.backbone.resolve())
    address_file = run / "address"
    server_flags = _flags(
        cert=certs / "server" / "server.pem",
        key=certs / "server" / "server.key",
        ca=certs / "server" / "ca.pem",
        listen="127.0.0.1:0",
        address_file=address_file,
        task="digits-transfer",
        num_rounds=args.rounds,
        min_clients=args.clients,
        min_fit_clients=args.clients,
        local_epochs=args.local_epochs,
        learning_rate=args.learning_rate,
        seed=args.seed,
        heartbeat_interval_seconds=2,
        run_dir=run,
        state_dir=run / "state",
        **settings,
    )
    server = _spawn(["server", *server_flags], run / "server.log", env)
    processes = [server]
    try:
        while not (address_file.exists() and address_file.read_text().strip()):
            if server.poll() is not None:
                raise SystemExit(f"coordinator exited; see {run / 'server.log'}")
            time.sleep(0.2)
        address = address_file.read_text().strip()
        for index in range(args.clients):
            name = f"client-{index + 1}"
            bundle = certs / name
            client_flags = _flags(
                server=address,
                cert=bundle / f"{name}.pem",
                key=bundle / f"{name}.key",
                ca=bundle / "ca.pem",
                task="digits-transfer",
                partition="iid",
                partition_index=index,
                num_partitions=args.clients,
                seed=args.seed,
                device="cpu",
            )
            processes.append(_spawn(["client", *client_flags], run / f"{name}.log", env))
        if server.wait() != 0:
            raise SystemExit(f"coordinator failed; see {run / 'server.log'}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


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
        init_ca(certs / "ca")
        issue_certificate(
            certs / "ca", certs / "server", "server", role="server", hosts=["127.0.0.1"]
        )
        for index in range(args.clients):
            name = f"client-{index + 1}"
            issue_certificate(certs / "ca", certs / name, name, role="client")
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
