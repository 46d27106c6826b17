"""benchmarks/load.py's protocol-level clients against a real `fedlink server` over mTLS: every
identity joins with its own certificate, downloads the model and uploads a valid update each
round it is sampled, and the benchmark's JSON reports what happened."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOAD = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


def test_protocol_clients_complete_rounds_and_the_report_adds_up(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    # Two levels against two coordinators: all 20 sampled, then half of them (fraction 0.5).
    run = subprocess.run(
        [
            sys.executable,
            str(LOAD),
            "--protocol",
            "--clients",
            "20,20:0.5",
            "--workers",
            "2",
            "--rounds",
            "2",
            "--timeout",
            "90",
            "--out",
            str(out),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    document = json.loads(out.read_text())
    assert document["error"] is None
    assert document["settings"]["clients_kind"] == "protocol"
    full, half = document["levels"]
    assert (full["sampled"], half["sampled"]) == (20, 10)
    for level in (full, half):
        assert level["passed"], level
        assert level["clients_joined"] == 20
        assert level["joined_seconds"] is not None and 0 < level["joined_seconds"] < 60
        assert level["rounds_completed"] == 2
        assert level["accepted_per_round"] == level["sampled_per_round"] == [level["sampled"]] * 2
        assert level["failure_count"] == 0 and level["failures"] == {}, level["failures"]
        assert level["clients_stopped"] == 20  # every identity was told the federation is over
        assert level["server_exit"] == 0
        # One connection per identity: the coordinator held at least 20 descriptors.
        assert level["server_peak_fds"] >= 20
        assert level["server_peak_threads"] >= 1
        assert level["server_peak_rss_bytes"] > 10 << 20
        assert level["cpu_seconds_per_round"] > 0
        assert all(row["cpu_seconds"] > 0 for row in level["rounds"])
    fit = document["cpu_fit"]
    assert fit is not None and fit["x"] == "clients sampled"
    assert "coordinator CPU per round" in run.stdout
