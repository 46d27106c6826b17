"""Robustness benchmark: final test accuracy of each aggregation rule under each attack.

    .venv/bin/python benchmarks/robustness.py                     # digits, IID and Dirichlet(0.5)
    .venv/bin/python benchmarks/robustness.py --partitions iid --rounds 10

10 clients, 3 of them malicious (a seeded choice), the built-in digits task split IID and
Dirichlet(alpha = 0.5) with the task's own partitioner; MNIST too when its data is on this machine
(`--tasks digits,mnist`; it is never downloaded, and a run takes far longer).

The federation runs as an IN-PROCESS SIMULATION, not over gRPC, so the whole matrix takes minutes
on 2 cores: every round each client loads the global model, trains it with the task's own
`train()` on its own partition (`load_data`), the attackers poison their models with the attack
code of `fedlink client --simulate-attack` (client/attacks.py), every update passes the
coordinator's validation (`check_num_examples`, `check_update`), and the next global model is
computed by the real rule from server/robust.py, updates in client order, as the coordinator
orders them by identity. Accuracy is the task's `evaluate()` on its centralized test set after the
last round. Everything is seeded: the same arguments give the same table.

Attacks (see docs/aggregation.md): sign flip; scaling = model replacement of a label-flipped
model by the number of clients (x10); Gaussian noise sigma = 200; label flipping y -> 9 - y;
ALIE with colluding attackers that pool their own honest models (mu - z sigma, z = z_max of
Baruch et al. for n = 10, f = 3). Rules: FedAvg, FedAvg with clipping to the round's median
update norm, coordinate-wise median, trimmed mean (beta = 0.3, i.e. 3 trimmed per side), Krum
and Multi-Krum (f = 3; Multi-Krum averages m = n - f = 7).

Prints one table per task and partition, and writes JSON (default
benchmarks/results/robustness.json) with every run's per-round accuracy.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from fedlink.client.attacks import (
    Attack,
    GaussianNoise,
    LabelFlip,
    Scaling,
    SignFlip,
    alie_state,
    alie_z,
    snapshot,
)
from fedlink.common.tasks import load_task, mnist
from fedlink.common.tasks.base import ClientData, DataRequest, TaskModule, TrainConfig
from fedlink.common.tensors import manifest_of
from fedlink.server.robust import (
    AggregationRule,
    FedAvg,
    Median,
    MultiKrum,
    NormClipping,
    TrimmedMean,
    Update,
)
from fedlink.server.validation import check_num_examples, check_update

CPU = torch.device("cpu")
MAX_NUM_EXAMPLES = 10_000_000  # the coordinator's default cap
ALIE = "alie"


def rules(num_attackers: int) -> dict[str, Callable[[], AggregationRule]]:
    f = num_attackers
    return {
        "fedavg": FedAvg,
        "clipped fedavg": lambda: NormClipping(FedAvg()),
        "median": Median,
        "trimmed mean": lambda: TrimmedMean(beta=0.3),
        "krum": lambda: MultiKrum(f=f, m=1),
        "multi-krum": lambda: MultiKrum(f=f),
    }


def attacks(num_clients: int) -> dict[str, Callable[[], Attack] | None]:
    """None: no attacker; ALIE is handled by the round itself (the attackers collude)."""
    return {
        "none": None,
        "sign flip": SignFlip,
        "scaling": lambda: Scaling(factor=float(num_clients)),
        "gaussian": lambda: GaussianNoise(sigma=200.0),
        "label flip": LabelFlip,
        ALIE: None,
    }


@dataclass(frozen=True)
class Setting:
    task: str
    partition: str
    num_clients: int
    num_attackers: int
    rounds: int
    local_epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    seed: int


def client_seed(seed: int, round_number: int, client: int) -> int:
    """A per-client, per-round training seed, derived the way the coordinator derives it."""
    digest = hashlib.sha256(f"{seed}:{round_number}:site-{client}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def run_federation(
    setting: Setting,
    task: TaskModule,
    datasets: dict[int, ClientData],
    attackers: list[int],
    rule: AggregationRule,
    attack: str,
    attack_factory: Callable[[], Attack] | None,
) -> list[float]:
    """Simulate one federation of the clients in `datasets` (client index -> its data); the
    centralized test accuracy after every round."""
    torch.manual_seed(setting.seed)  # the coordinator's seed builds the initial model
    model = task.build_model()
    global_state = snapshot(model)
    manifest = manifest_of(global_state)
    test = task.load_test_data()
    assert test is not None
    evil = set(attackers) if attack != "none" else set()
    z = alie_z(setting.num_clients, setting.num_attackers)
    accuracies: list[float] = []
    for round_number in range(1, setting.rounds + 1):
        updates: list[Update] = []
        colluders: list[int] = []
        for client, data in datasets.items():
            config = TrainConfig(
                local_epochs=setting.local_epochs,
                batch_size=setting.batch_size,
                learning_rate=setting.learning_rate,
                momentum=setting.momentum,
                seed=client_seed(setting.seed, round_number, client),
            )
            torch.manual_seed(config.seed)
            model.load_state_dict(global_state)
            if client in evil and attack_factory is not None:
                result = attack_factory().train(task, model, data, config, CPU)
            else:
                result = task.train(model, data, config, CPU)
                if client in evil:  # ALIE: honest first, poisoned below with the others' help
                    colluders.append(len(updates))
            updates.append((float(result.num_examples), snapshot(model)))
        if colluders:
            honest_views = [updates[i][1] for i in colluders]
            poisoned = alie_state(global_state, honest_views, z)
            for i in colluders:
                updates[i] = (updates[i][0], poisoned)
        for weight, state in updates:
            check_num_examples(int(weight), MAX_NUM_EXAMPLES)
            check_update(state, manifest)
        global_state = rule.aggregate(global_state, updates, manifest)
        model.load_state_dict(global_state)
        accuracies.append(task.evaluate(model, test, CPU).accuracy)
    return accuracies


def run_matrix(setting: Setting, verbose: bool) -> dict[str, Any]:
    task = load_task(setting.task)
    datasets = {
        i: task.load_data(
            DataRequest(
                partition=setting.partition,
                partition_index=i,
                num_partitions=setting.num_clients,
                seed=setting.seed,
            )
        )
        for i in range(setting.num_clients)
    }
    attackers = sorted(
        random.Random(setting.seed).sample(range(setting.num_clients), setting.num_attackers)
    )
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    for attack, attack_factory in attacks(setting.num_clients).items():
        for rule_name, rule_factory in rules(setting.num_attackers).items():
            t0 = time.perf_counter()
            curve = run_federation(
                setting, task, datasets, attackers, rule_factory(), attack, attack_factory
            )
            runs.append(
                {
                    "attack": attack,
                    "rule": rule_name,
                    "final_accuracy": curve[-1],
                    "accuracy_per_round": curve,
                    "seconds": time.perf_counter() - t0,
                }
            )
            if verbose:
                print(
                    f"  {setting.partition:>13} {attack:>10} {rule_name:>14}: {curve[-1]:.3f}",
                    file=sys.stderr,
                )
    # The ceiling for any rule that ignores the attackers: FedAvg over the honest clients alone.
    honest = {i: data for i, data in datasets.items() if i not in attackers}
    honest_curve = run_federation(setting, task, honest, [], FedAvg(), "none", None)
    return {
        "setting": asdict(setting),
        "attackers": attackers,
        "client_sizes": [len(d.train) for d in datasets.values()],  # type: ignore[arg-type]
        "honest_only_fedavg": {
            "final_accuracy": honest_curve[-1],
            "accuracy_per_round": honest_curve,
        },
        "alie_z": alie_z(setting.num_clients, setting.num_attackers),
        "seconds": time.perf_counter() - started,
        "runs": runs,
    }


def summarize(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The accuracy table (attacks x rules, in %) and which rules meet the issue's target."""
    runs = result["runs"]
    rule_names = list(dict.fromkeys(r["rule"] for r in runs))
    attack_names = list(dict.fromkeys(r["attack"] for r in runs))
    accuracy = {(r["attack"], r["rule"]): 100 * r["final_accuracy"] for r in runs}
    reference = accuracy[("none", "fedavg")]
    first = max(len(name) for name in ["attack", *attack_names])
    lines = [
        "| " + "attack".ljust(first) + " | " + " | ".join(rule_names) + " |",
        "| "
        + "-" * first
        + " | "
        + " | ".join("-" * (len(r) - 1) + ":" for r in rule_names)
        + " |",
    ]
    for attack in attack_names:
        cells = [f"{accuracy[(attack, rule)]:.1f}".rjust(len(rule)) for rule in rule_names]
        lines.append("| " + attack.ljust(first) + " | " + " | ".join(cells) + " |")
    within = {
        rule: all(accuracy[(attack, rule)] >= reference - 5 for attack in attack_names)
        for rule in rule_names
    }
    uncovered = [
        attack
        for attack in attack_names
        if not any(
            accuracy[(attack, rule)] >= reference - 5 for rule in rule_names if rule != "fedavg"
        )
    ]
    verdict = {
        "no_attack_fedavg": reference,
        "honest_only_fedavg": 100 * result["honest_only_fedavg"]["final_accuracy"],
        "rules_within_5_points_under_every_attack": [r for r, ok in within.items() if ok],
        "attacks_no_robust_rule_survives": uncovered,
        "fedavg_under_scaling": accuracy.get(("scaling", "fedavg")),
        "fedavg_under_gaussian": accuracy.get(("gaussian", "fedavg")),
    }
    return "\n".join(lines), verdict


def mnist_present() -> bool:
    return (mnist.DEFAULT_ROOT / "MNIST" / "raw").is_dir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="digits,mnist", help="comma-separated task names")
    parser.add_argument("--partitions", default="iid,dirichlet:0.5")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--attackers", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = reproducible)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/robustness.json"))
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run's result")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if "mnist" in tasks and not mnist_present():
        print(f"mnist: skipped (no local copy in {mnist.DEFAULT_ROOT}/MNIST/raw)")
        tasks.remove("mnist")
    print(
        "In-process simulation: the tasks' own train/evaluate, the coordinator's validation and "
        "the real aggregation rules (server/robust.py); no gRPC."
    )
    results: list[dict[str, Any]] = []
    for task_name in tasks:
        for partition in (p.strip() for p in args.partitions.split(",")):
            setting = Setting(
                task=task_name,
                partition=partition,
                num_clients=args.clients,
                num_attackers=args.attackers,
                rounds=args.rounds,
                local_epochs=args.local_epochs,
                batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                momentum=args.momentum,
                seed=args.seed,
            )
            result = run_matrix(setting, args.verbose)
            table, verdict = summarize(result)
            result["table"], result["verdict"] = table, verdict
            results.append(result)
            print(
                f"\n{task_name}, {partition}: {args.clients} clients, attackers {result['attackers']}, "
                f"{args.rounds} rounds, final test accuracy (%), {result['seconds']:.0f} s"
            )
            print(table)
            within = verdict["rules_within_5_points_under_every_attack"]
            print(
                f"no-attack FedAvg {verdict['no_attack_fedavg']:.1f}%; FedAvg over the "
                f"{args.clients - args.attackers} honest clients alone (attackers excluded perfectly, "
                f"their data lost) {verdict['honest_only_fedavg']:.1f}%"
            )
            print(
                f"within 5 points of no-attack FedAvg under every attack: {', '.join(within) or 'no rule'}; attacks no robust rule stays "
                f"within 5 points of: {', '.join(verdict['attacks_no_robust_rule_survives']) or 'none'}"
            )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "robustness",
        "mode": "in-process simulation (real task train/evaluate, validation, aggregation rules)",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "fedlink": importlib.metadata.version("fedlink"),
            "cpus": os.cpu_count(),
            "torch_threads": args.threads,
        },
        "results": results,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
