"""A coordinator certificate the client cannot trust is a mistake to fix, not an outage to wait
out: real `fedlink client` and `fedlink health` processes against a real mTLS coordinator, with
a bundle from another CA and with a wrong server name, stop at once and say which."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_health import _health

from fedlink.common.pki import init_ca, issue_certificate
from fedlink.common.tensors import StateDict


def _client(address: str, cert: Path, key: Path, ca: Path, *flags: str) -> tuple[int, str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedlink",
            "client",
            f"--server={address}",
            f"--cert={cert}",
            f"--key={key}",
            f"--ca={ca}",
            "--task=digits",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode, result.stdout + result.stderr, time.monotonic() - started


@pytest.fixture
def rogue_bundle(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A client bundle from another federation's CA (named 'Rogue Federation CA')."""
    init_ca(tmp_path / "rogue-ca", name="Rogue Federation CA")
    issue_certificate(tmp_path / "rogue-ca", tmp_path / "site", "site", role="client")
    return tmp_path / "site" / "site.pem", tmp_path / "site" / "site.key", tmp_path / "site/ca.pem"


def test_a_bundle_from_another_ca_exits_2_at_once_naming_both_cas(
    start_coordinator: Any, small_state: StateDict, rogue_bundle: tuple[Path, Path, Path]
) -> None:
    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    code, output, seconds = _client(coordinator.address, *rogue_bundle)
    assert code == 2, output
    assert seconds < 20, f"took {seconds:.1f}s: retried as if the network were down"
    assert "is not signed by the CA in" in output and "Rogue Federation CA" in output
    assert "use the federation's CA certificate" in output
    assert "retrying" not in output and "Traceback" not in output


def test_a_wrong_server_name_exits_2_at_once_naming_the_names(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    code, output, seconds = _client(
        coordinator.address, *pki.client("site"), "--server-name=coordinator.example.org"
    )
    assert code == 2, output
    assert seconds < 20, f"took {seconds:.1f}s: retried as if the network were down"
    assert "not valid for the name 'coordinator.example.org'" in output
    assert "'localhost'" in output and "set --server-name" in output
    assert "retrying" not in output


def test_health_names_the_certificate_problem_instead_of_openssl_text(
    start_coordinator: Any, small_state: StateDict, rogue_bundle: tuple[Path, Path, Path]
) -> None:
    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    cert, key, ca = rogue_bundle
    result = _health(
        f"--server={coordinator.address}", f"--cert={cert}", f"--key={key}", f"--ca={ca}"
    )
    assert result.returncode == 1
    assert "is not signed by the CA in" in result.stdout and "Rogue Federation CA" in result.stdout
    assert "CERTIFICATE_VERIFY_FAILED" not in result.stdout
