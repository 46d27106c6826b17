"""torch's CPU thread pool is sized to what this process may use, or to what it is told."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _threads_in_child(requested: int, env: dict[str, str], cpus: str | None) -> int:
    """`size_torch_threads(requested)` in a fresh interpreter (torch reads OMP_NUM_THREADS at
    import, and the affinity is the child's own), pinned to `cpus` with taskset when given."""
    code = (
        "from fedlink.common.threads import size_torch_threads; "
        f"print(size_torch_threads({requested}))"
    )
    command = [sys.executable, "-c", code]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


def _environment(**extra: str) -> dict[str, str]:
    environ = {
        k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    }
    return {**environ, **extra}


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs to pin to one")
def test_automatic_threads_follow_the_cpus_this_process_may_run_on() -> None:
    assert _threads_in_child(0, _environment(), cpus="0") == 1
    assert _threads_in_child(0, _environment(), cpus="0,1") == 2


def test_omp_num_threads_and_an_explicit_count_win_over_the_automatic_choice() -> None:
    assert _threads_in_child(0, _environment(OMP_NUM_THREADS="1"), cpus=None) == 1
    assert _threads_in_child(3, _environment(OMP_NUM_THREADS="1"), cpus=None) == 3
