"""How many CPU threads torch computes with: the CPUs this process may use, not the machine's.

torch sizes its thread pool to the machine's cores. In a container limited to one CPU on a
64-core host, or with several clients on one machine, that means dozens of threads spinning on a
few cores, and small-batch training runs 10-100x slower. `joblib.cpu_count()` (already installed
with scikit-learn) counts what this process may actually use: its CPU affinity and its cgroup's
CPU quota (Docker/podman `--cpus`, Kubernetes limits).
"""

from __future__ import annotations

import logging
import os

import joblib
import torch

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may use (affinity and cgroup quota), at least 1."""
    cpus: int = joblib.cpu_count()
    return max(1, cpus)


def size_torch_threads(requested: int) -> int:
    """Set torch's intra-op thread count and return it.

    `requested` > 0 is used as given; 0 means automatic: `OMP_NUM_THREADS` when the environment
    sets it (torch already honours it), otherwise the CPUs this process may use.
    """
    if requested > 0:
        torch.set_num_threads(requested)
    elif os.environ.get("OMP_NUM_THREADS"):
        pass  # told otherwise by the environment, which torch read at import
    else:
        torch.set_num_threads(usable_cpus())
    return torch.get_num_threads()
