"""Simulation benchmark: `fedlink simulate` against a plain PyTorch FedAvg loop, in one run.

The workload (issue 15): the FedAvg CNN on Fashion-MNIST, 50 images per client
(benchmarks/fmnist50_task.py), 10 clients sampled per round, one local epoch of batch 10, no
evaluation during the rounds. Measured:

- 100 clients for `--rounds` rounds, simulated and in a plain loop (one process: load the
  state, train, add n_i * w_i, divide; the same clients, seeds and training code): seconds
  per round, start-up, and the final model's accuracy on the 10,000 test images;
- the simulation again with each of `--scale` clients (10 per round, `--scale-rounds`
  rounds): peak memory of the simulation process and of its largest worker, which must not
  grow with the number of clients.

Start-up is from the call to `run_simulation` (torch and the task module already imported)
until every virtual client has joined and round 1 can start; for the plain loop, building the
model and reading the data. Each simulation runs in a child process. Prints a table and writes JSON (default
benchmarks/results/simulation.json). Needs Fashion-MNIST in /usr/share/datasets/fashion-mnist
(`apt-get install dataset-fashion-mnist`) or `--data-dir`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
SEED = 0
PER_ROUND = 10
TRAINING = {"local_epochs": 1, "batch_size": 10, "learning_rate": 0.05, "momentum": 0.0}


def _task() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    import fmnist50_task

    return fmnist50_task


def _accuracy(state: dict[str, Any]) -> float:
    import torch

    from fedlink.common.task_settings import NO_SETTINGS
    from fedlink.common.tasks.contract import evaluate

    task = _task()
    model = task.build_model()
    model.load_state_dict(state)
    result = evaluate(task, model, task.test_set(), torch.device("cpu"), NO_SETTINGS)
    return float(result.metrics["accuracy"])


def simulate(clients: int, rounds: int, directory: Path, data_dir: Path | None) -> dict[str, Any]:
    """One `fedlink simulate` run through the Python API, in this (child) process."""
    import safetensors.torch

    from fedlink.common.logs import configure_logging
    from fedlink.simulation.app import run_simulation
    from fedlink.simulation.config import SimulationConfig

    os.environ["PYTHONPATH"] = str(BENCHMARKS)
    sys.path.insert(0, str(BENCHMARKS))
    configure_logging(verbose=False)
    joined: list[float] = []

    class Joined(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "virtual clients joined" in record.getMessage():
                joined.append(time.perf_counter())

    logging.getLogger("fedlink.simulation.driver").addHandler(Joined())
    _task()  # imported before the clock starts, as for the plain loop
    config = SimulationConfig(
        task="fmnist50_task",
        num_clients=clients,
        fraction_fit=PER_ROUND / clients,
        min_fit_clients=PER_ROUND,
        num_rounds=rounds,
        evaluate_every=0,
        seed=SEED,
        data_dir=data_dir,
        tensorboard=False,
        run_dir=directory / "run",
        state_dir=directory / "state",
        **TRAINING,  # type: ignore[arg-type]
    )
    started = time.perf_counter()
    code = run_simulation(config)
    wall = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the accuracy
    assert code == 0, f"fedlink simulate exited {code}"
    rows = [json.loads(line) for line in (directory / "run" / "metrics.jsonl").open()]
    final = safetensors.torch.load_file(str(directory / "run" / "final_model.safetensors"))
    return {
        "clients": clients,
        "rounds": rounds,
        "startup_s": joined[0] - started,
        "round_s": [row["seconds"] for row in rows],
        "wall_s": wall,
        "accuracy": _accuracy(final),
        "rss_mib": rss,
        "worker_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def plain_loop(clients: int, rounds: int, threads: int, data_dir: Path | None) -> dict[str, Any]:
    """FedAvg in a plain PyTorch loop: the same clients per round, seeds and training code,
    with `threads` torch threads."""
    import torch

    from fedlink.common.tasks.base import DataRequest, TrainConfig
    from fedlink.common.threads import size_torch_threads

    size_torch_threads(threads)
    task = _task()
    names = sorted(f"client-{i:0{len(str(clients - 1))}d}" for i in range(clients))
    started = time.perf_counter()
    torch.manual_seed(SEED)
    model = task.build_model()
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    task.load_data(
        DataRequest(partition_index=0, num_partitions=clients, seed=SEED, data_dir=data_dir)
    )
    startup = time.perf_counter() - started
    seconds = []
    for round_number in range(1, rounds + 1):
        began = time.perf_counter()
        # As the round engine samples: max(min_fit_clients, ceil(fraction_fit x population)).
        count = max(PER_ROUND, math.ceil(PER_ROUND / clients * len(names)))
        sampled = sorted(random.Random(f"{SEED}:{round_number}:0").sample(names, count))
        total = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in global_state.items()}
        examples = 0
        for name in sampled:
            digest = hashlib.sha256(f"{SEED}:{round_number}:{name}".encode()).digest()
            seed = int.from_bytes(digest[:8], "little") >> 1
            data = task.load_data(
                DataRequest(
                    partition_index=int(name.split("-")[1]),
                    num_partitions=clients,
                    seed=SEED,
                    data_dir=data_dir,
                )
            )
            model.load_state_dict(global_state)
            torch.manual_seed(seed)
            result = task.train(
                model, data, TrainConfig(seed=seed, **TRAINING), torch.device("cpu")
            )
            for key, value in model.state_dict().items():
                total[key] += value.float() * result.num_examples
            examples += result.num_examples
        global_state = {k: (v / examples).to(global_state[k].dtype) for k, v in total.items()}
        seconds.append(time.perf_counter() - began)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "clients": clients,
        "rounds": rounds,
        "startup_s": startup,
        "round_s": seconds,
        "accuracy": _accuracy(global_state),
        "rss_mib": rss,
    }


def _child(clients: int, rounds: int, data_dir: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as directory:
        command = [sys.executable, __file__, "--child", str(clients), str(rounds), directory]
        if data_dir is not None:
            command += ["--data-dir", str(data_dir)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"simulation of {clients} clients failed:\n{done.stderr[-4000:]}")
        result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
        return result


def _steady(seconds: list[float]) -> float:
    """Mean seconds per round after the first (which pays torch's first-use costs)."""
    return statistics.fmean(seconds[1:]) if len(seconds) > 1 else seconds[0]


def main() -> None:
    from fedlink.common.threads import usable_cpus

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--scale", type=int, nargs="*", default=[1_000, 10_000])
    parser.add_argument("--scale-rounds", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=BENCHMARKS / "results" / "simulation.json")
    parser.add_argument(
        "--child", nargs=3, metavar=("CLIENTS", "ROUNDS", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        clients, rounds, directory = args.child
        result = simulate(int(clients), int(rounds), Path(directory), args.data_dir)
        print(json.dumps(result))
        return
    runs = [{"runtime": "fedlink simulate", **_child(args.clients, args.rounds, args.data_dir)}]
    runs += [
        {"runtime": "fedlink simulate", **_child(n, args.scale_rounds, args.data_dir)}
        for n in args.scale
    ]
    # The plain loop as written (torch's threads: every usable CPU), and with one thread like
    # each simulation worker; the faster one is the reference.
    runs[1:1] = [
        {
            "runtime": f"plain loop {t} thr",
            **plain_loop(args.clients, args.rounds, t, args.data_dir),
        }
        for t in (usable_cpus(), 1)
    ]
    print(
        f"{'runtime':<18}{'clients':>8}{'rounds':>7}{'s/round':>9}{'round 1 s':>10}"
        f"{'start-up s':>11}{'accuracy':>9}{'RSS MiB':>9}{'worker MiB':>11}"
    )
    for run in runs:
        worker = run.get("worker_rss_mib")
        print(
            f"{run['runtime']:<18}{run['clients']:>8}{run['rounds']:>7}"
            f"{_steady(run['round_s']):>9.3f}{run['round_s'][0]:>10.3f}{run['startup_s']:>11.2f}"
            f"{run['accuracy']:>9.4f}{run['rss_mib']:>9.0f}"
            f"{'-' if worker is None else f'{worker:.0f}':>11}"
        )
    simulated, plain = runs[0], min(runs[1:3], key=lambda run: _steady(run["round_s"]))
    ratio = _steady(simulated["round_s"]) / _steady(plain["round_s"])
    print(f"per round: simulation / faster plain loop = {ratio:.2f} (target <= 1.1)")
    report = {
        "workload": {"per_round": PER_ROUND, **TRAINING, "samples_per_client": 50},
        "load_average": os.getloadavg(),
        "cpus": os.cpu_count(),
        "ratio": ratio,
        "runs": runs,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
