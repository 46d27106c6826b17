"""benchmarks/strategies.py in miniature: real client code and the real engine in process, the
JSON it writes, and FedProx's mu reaching the clients (its run differs from FedAvg's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[2] / "benchmarks" / "strategies.py"


def test_the_strategy_benchmark_runs_each_strategy_on_the_same_federation(tmp_path: Path) -> None:
    out = tmp_path / "strategies.json"
    run = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--tasks=digits",
            "--partitions=classes:2",
            "--strategies=fedavg,fedprox",
            "--rounds=2",
            "--clients=3",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "| fedprox |" in run.stdout
    (result,) = json.loads(out.read_text())["results"]
    runs = result["runs"]
    assert set(runs) == {"fedavg", "fedprox"}
    assert all(len(r["accuracy"]) == 2 and 0 <= r["final"] <= 1 for r in runs.values())
    # Same seeds, same partition, same local work: only the proximal term differs.
    assert runs["fedavg"]["accuracy"] != runs["fedprox"]["accuracy"]
