"""Strategy benchmark: test accuracy of each built-in strategy on label-skewed federations.

    .venv/bin/python benchmarks/strategies.py                       # digits and Fashion-MNIST
    .venv/bin/python benchmarks/strategies.py --tasks digits --rounds 30 --strategies fedavg,fedprox

10 clients split with the tasks' own partitioners: label skew of 2 classes per client
(`classes:2`) and Dirichlet(0.1) and Dirichlet(0.5). For every strategy the same seeds give the
same initial model, the same partition and the same local work (local epochs, batch size,
learning rate, shuffling); only the strategy differs. Reported: the centralized test accuracy
after the last round, the best one seen, and the first round that reached the target accuracy.

Each federation is the real thing minus sockets: the coordinator's RoundEngine and servicer
(strategy, validation, streaming aggregation, checkpoints) talk to 10 real FederationClient
objects, each with its own certificate, through server/inprocess.py. So FedProx's mu travels in
the task settings of every header and is applied by the clients' own training loop, and
SCAFFOLD's control variates travel in the task payloads and results (each client keeps its c_i
in memory between rounds: the benchmark's clients run for the whole federation).

Fashion-MNIST is read from Debian's dataset-fashion-mnist package (or --fashion-dir); to run in
minutes on 2 cores the clients share the first --fashion-train training images and the
coordinator tests on the first --fashion-test test images (written as IDX files to a work
directory that the task reads as its --data-dir). Digits uses its whole bundled data set.

Prints one table per task and partition, and writes JSON (default
benchmarks/results/strategies.json) with every run's per-round accuracy.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import grpc
import torch

from fedlink.client.app import FederationClient
from fedlink.client.config import ClientConfig
from fedlink.common.pki import init_ca, issue_certificate
from fedlink.common.tasks import fashion_mnist, load_task
from fedlink.common.tasks.contract import evaluate, load_test_set
from fedlink.common.tensors import StateDict
from fedlink.server.config import ServerConfig
from fedlink.server.inprocess import InProcessServices
from fedlink.server.phases import RoundRecord
from fedlink.server.rounds import RoundEngine
from fedlink.server.service import FederationServicer, add_federation_service

# Server-side parameters: the papers' usual values, not tuned to this benchmark.
STRATEGIES: dict[str, dict[str, float]] = {
    "fedavg": {},
    "fedavgm": {"eta": 1.0, "beta": 0.9},
    "fedadam": {"eta": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 0.01, "beta1": 0.9, "tau": 1e-3},
    "fedprox": {"mu": 0.1},
    "scaffold": {"eta": 1.0},
}
PARTITIONS = ("classes:2", "dirichlet:0.1", "dirichlet:0.5")
TARGETS = {"digits": 0.85, "fashion-mnist": 0.70}
# The clients' local work, the same for every strategy: enough local steps per round for the
# clients' models to drift apart on skewed data, which is what FedProx and the server
# optimizers are meant to correct.
LOCAL_WORK: dict[str, dict[str, Any]] = {
    "digits": {"local_epochs": 5, "batch_size": 16, "learning_rate": 0.05, "momentum": 0.0},
    "fashion-mnist": {"local_epochs": 2, "batch_size": 32, "learning_rate": 0.02, "momentum": 0.0},
}


@dataclass(frozen=True)
class Setting:
    task: str
    partition: str
    rounds: int
    clients: int
    seed: int
    data_dir: Path | None


def write_idx(path: Path, array: torch.Tensor) -> None:
    """`array` (uint8) as an IDX file of unsigned bytes, the format the task reads."""
    magic = 0x00000800 | array.dim()
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.contiguous().numpy().tobytes())


def fashion_subset(source: Path | None, train: int, test: int, folder: Path) -> Path:
    """The first `train` training and `test` test images of Fashion-MNIST, as IDX files in
    `folder`, read through the task's own loader."""
    folder.mkdir(parents=True, exist_ok=True)
    for is_train, count in ((True, train), (False, test)):
        images, labels = fashion_mnist.load_images(source, train=is_train)
        images_name, labels_name = fashion_mnist.IDX_FILES[is_train]
        write_idx(folder / images_name, images[:count].to(torch.uint8))
        write_idx(folder / labels_name, labels[:count].to(torch.uint8))
    return folder


def run_federation(
    setting: Setting, strategy: str, pki: Path, work: Path
) -> tuple[list[float], float]:
    """One federation; (test accuracy after each round, seconds)."""
    task = load_task(setting.task)
    torch.manual_seed(setting.seed)
    initial: StateDict = task.build_model().state_dict()
    config = ServerConfig(
        listen="127.0.0.1:0",
        cert=pki / "server" / "server.pem",
        key=pki / "server" / "server.key",
        ca=pki / "ca" / "ca.pem",
        run_dir=work / "run",
        state_dir=work / "state",
        task=setting.task,
        num_rounds=setting.rounds,
        min_clients=setting.clients,
        min_fit_clients=setting.clients,
        fraction_fit=1.0,
        evaluate_every=0,
        strategy=strategy,
        strategy_params=STRATEGIES[strategy],
        seed=setting.seed,
        test_data_dir=setting.data_dir if setting.task != "digits" else None,
        **LOCAL_WORK[setting.task],
    )
    test_set = load_test_set(task, config.test_data_dir)
    assert test_set is not None
    model = task.build_model()

    def evaluate_centrally(state: StateDict) -> dict[str, float]:
        model.load_state_dict(state)
        result = evaluate(task, model, test_set, torch.device("cpu"), config.task_config)
        return result.metrics

    records: list[RoundRecord] = []
    engine = RoundEngine(
        config, initial, evaluate_centrally=evaluate_centrally, on_round=records.append
    )
    executor = ThreadPoolExecutor(2)
    servicer = FederationServicer(engine, config, "in-process", executor)
    services = InProcessServices(functools.partial(add_federation_service, servicer))
    started = time.perf_counter()
    try:
        threads = [threading.Thread(target=engine.run, args=(threading.Event(),))]
        for index in range(setting.clients):
            name = f"site-{index}"
            bundle = pki / name
            client = FederationClient(
                ClientConfig(
                    server="in-process:0",
                    cert=bundle / f"{name}.pem",
                    key=bundle / f"{name}.key",
                    ca=bundle / "ca.pem",
                    task=setting.task,
                    partition=setting.partition,
                    num_partitions=setting.clients,
                    partition_index=index,
                    seed=setting.seed,
                    data_dir=setting.data_dir,
                    threads=1,
                    spool_dir=work,
                ),
                # Quacks like a grpc.Channel for the generated stubs (server/inprocess.py).
                channel=cast(
                    grpc.Channel,
                    services.channel((bundle / f"{name}.pem").read_bytes(), name),
                ),
            )
            threads.append(threading.Thread(target=client.run))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.request_stop()
        services.close()
        executor.shutdown()
    seconds = time.perf_counter() - started
    accuracies = [r.test_accuracy for r in records]
    if len(accuracies) != setting.rounds or any(a is None for a in accuracies):
        raise RuntimeError(f"{strategy} on {setting}: rounds missing ({len(records)} recorded)")
    return [float(a) for a in accuracies if a is not None], seconds


def make_pki(root: Path, clients: int) -> Path:
    init_ca(root / "ca")
    issue_certificate(root / "ca", root / "server", "server", role="server", hosts=["localhost"])
    for index in range(clients):
        issue_certificate(root / "ca", root / f"site-{index}", f"site-{index}", role="client")
    return root


def rounds_to(accuracies: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(accuracies) if a >= target), None)


def table(setting: Setting, runs: dict[str, dict[str, Any]], target: float) -> str:
    lines = [
        f"{setting.task}, {setting.partition}, {setting.clients} clients, {setting.rounds} rounds",
        f"| strategy | accuracy after {setting.rounds} | best | rounds to {target:.0%} | s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for strategy, run in runs.items():
        reached = run["rounds_to_target"]
        lines.append(
            f"| {strategy} | {run['final']:.3f} | {max(run['accuracy']):.3f} | "
            f"{'—' if reached is None else reached} | {run['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits,fashion-mnist")
    parser.add_argument("--partitions", default=",".join(PARTITIONS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument(
        "--rounds", type=int, default=None, help="default: digits 20, fashion-mnist 8"
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true", help="log each client's rounds")
    parser.add_argument("--fashion-dir", type=Path, default=None)
    parser.add_argument("--fashion-train", type=int, default=3000)
    parser.add_argument("--fashion-test", type=int, default=2000)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "strategies.json"
    )
    args = parser.parse_args()
    strategies = args.strategies.split(",")
    if unknown := set(strategies) - set(STRATEGIES):
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    logging.basicConfig(level=logging.WARNING)
    if args.verbose:
        logging.getLogger("fedlink.client.app").setLevel(logging.INFO)
    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pki = make_pki(root / "pki", args.clients)
        for task in args.tasks.split(","):
            data_dir = None
            if task == "fashion-mnist":
                data_dir = fashion_subset(
                    args.fashion_dir, args.fashion_train, args.fashion_test, root / "fashion"
                )
            rounds = args.rounds or (20 if task == "digits" else 8)
            for partition in args.partitions.split(","):
                setting = Setting(task, partition, rounds, args.clients, args.seed, data_dir)
                runs: dict[str, dict[str, Any]] = {}
                for strategy in strategies:
                    work = Path(tempfile.mkdtemp(dir=root))
                    accuracy, seconds = run_federation(setting, strategy, pki, work)
                    runs[strategy] = {
                        "params": STRATEGIES[strategy],
                        "accuracy": accuracy,
                        "final": accuracy[-1],
                        "rounds_to_target": rounds_to(accuracy, TARGETS[task]),
                        "seconds": seconds,
                    }
                    print(f"  {task} {partition} {strategy}: {accuracy[-1]:.3f} ({seconds:.0f} s)")
                print(table(setting, runs, TARGETS[task]), flush=True)
                results.append(
                    {
                        "task": task,
                        "partition": partition,
                        "rounds": rounds,
                        "clients": args.clients,
                        "seed": args.seed,
                        "target": TARGETS[task],
                        "runs": runs,
                    }
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                "load_average": os.getloadavg(),
                "local_work": {task: LOCAL_WORK[task] for task in args.tasks.split(",")},
                "fashion_subset": {"train": args.fashion_train, "test": args.fashion_test},
                "results": results,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
