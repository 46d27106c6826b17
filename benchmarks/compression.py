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
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from fedlink.common.pki import init_ca, issue_certificate

CODECS: dict[str, dict[str, object]] = {
    "fp32": {"update_codec": "fp32"},
    "fp16": {"update_codec": "fp16"},
    "bf16": {"update_codec": "bf16"},
    "int8": {"update_codec": "int8"},
    "int8 top-10%": {"update_codec": "int8", "update_topk": 0.1},
}
CLIENTS = 2


def _flags(**values: object) -> list[str]:
    return [f"--{name.replace('_', '-')}={value}" for name, value in values.items()]


def _spawn(arguments: list[str], log: Path) -> subprocess.Popen[bytes]:
    out: IO[bytes] = open(log, "wb")  # noqa: SIM115 (owned by the child process)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fedlink", *arguments], stdout=out, stderr=out, env=env
    )


def _federation(
    args: argparse.Namespace, certs: Path, run: Path, settings: dict[str, object]
) -> list[dict[str, Any]]:
    run.mkdir(parents=True)
    address_file = run / "address"
    server = _spawn(
        [
            "server",
            *_flags(
                cert=certs / "server" / "server.pem",
                key=certs / "server" / "server.key",
                ca=certs / "server" / "ca.pem",
                listen="127.0.0.1:0",
                address_file=address_file,
                task=args.task,
                num_rounds=args.rounds,
                min_clients=CLIENTS,
                min_fit_clients=CLIENTS,
                local_epochs=1,
                learning_rate=args.learning_rate,
                seed=args.seed,
                evaluate_every=0,
                heartbeat_interval_seconds=2,
                run_dir=run,
                state_dir=run / "state",
                **settings,
            ),
        ],
        run / "server.log",
    )
    processes = [server]
    try:
        while not (address_file.exists() and address_file.read_text().strip()):
            if server.poll() is not None:
                raise SystemExit(f"coordinator exited; see {run / 'server.log'}")
            time.sleep(0.2)
        address = address_file.read_text().strip()
        for index in range(CLIENTS):
            name = f"client-{index + 1}"
            bundle = certs / name
            processes.append(
                _spawn(
                    [
                        "client",
                        *_flags(
                            server=address,
                            cert=bundle / f"{name}.pem",
                            key=bundle / f"{name}.key",
                            ca=bundle / "ca.pem",
                            task=args.task,
                            partition="iid",
                            partition_index=index,
                            num_partitions=args.partitions,
                            seed=args.seed,
                            device="cpu",
                            state_dir=run / f"{name}-state",
                        ),
                    ],
                    run / f"{name}.log",
                )
            )
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
        init_ca(certs / "ca")
        issue_certificate(
            certs / "ca", certs / "server", "server", role="server", hosts=["127.0.0.1"]
        )
        for index in range(CLIENTS):
            name = f"client-{index + 1}"
            issue_certificate(certs / "ca", certs / name, name, role="client")
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
