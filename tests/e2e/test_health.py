"""`fedlink health` against a live coordinator: the container healthcheck's command."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from fedlink.common.tensors import StateDict
from fedlink.server.rounds import RoundEngine
from fedlink.server.transport import start_server


def _health(*arguments: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FEDLINK_")}
    return subprocess.run(
        [sys.executable, "-m", "fedlink", "health", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        env={**environment, **(env or {})},
    )


def _bundle_flags(pki: Any, name: str) -> list[str]:
    cert, key, ca = pki.client(name)
    return [f"--cert={cert}", f"--key={key}", f"--ca={ca}"]


def test_a_serving_coordinator_is_healthy(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    result = _health(f"--server={coordinator.address}", *_bundle_flags(pki, "healthcheck"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{coordinator.address}: SERVING"


def test_settings_come_from_fedlink_health_variables(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    cert, key, ca = pki.client("healthcheck")
    env = {
        "FEDLINK_HEALTH_SERVER": coordinator.address.replace("127.0.0.1", "localhost"),
        "FEDLINK_HEALTH_SERVER_NAME": "localhost",
        "FEDLINK_HEALTH_CERT": str(cert),
        "FEDLINK_HEALTH_KEY": str(key),
        "FEDLINK_HEALTH_CA": str(ca),
        "FEDLINK_HEALTH_SERVICE": "fedlink.v1.Federation",
    }
    result = _health(env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SERVING" in result.stdout


def test_a_coordinator_that_stopped_serving_is_unhealthy(
    pki: Any, small_state: StateDict, tmp_path: Path
) -> None:
    config = pki.server_config(tmp_path / uuid.uuid4().hex[:8], num_rounds=1)
    listening = start_server(config, RoundEngine(config, small_state))
    try:
        listening.set_serving(False)
        result = _health(f"--server=127.0.0.1:{listening.port}", *_bundle_flags(pki, "healthcheck"))
    finally:
        listening.server.stop(0)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stdout


def test_no_coordinator_is_unhealthy(pki: Any) -> None:
    nobody = "127.0.0.1:1"  # a privileged port nothing listens on in the test environment
    result = _health(
        f"--server={nobody}", "--timeout-seconds=2", *_bundle_flags(pki, "healthcheck")
    )
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stdout


def test_the_coordinators_own_server_certificate_is_not_accepted_as_a_client(
    pki: Any, start_coordinator: Any, small_state: StateDict
) -> None:
    # Why compose issues a separate `healthcheck` client certificate for the server container.
    coordinator = start_coordinator(small_state, num_rounds=1, min_clients=50)
    bundle = pki.server_dir
    result = _health(
        f"--server={coordinator.address}",
        f"--cert={bundle / 'server.pem'}",
        f"--key={bundle / 'server.key'}",
        f"--ca={bundle / 'ca.pem'}",
    )
    assert result.returncode == 2
    assert "is not a client certificate" in result.stderr


def test_missing_certificate_is_a_clear_error(pki: Any) -> None:
    result = _health("--server=127.0.0.1:50051")
    assert result.returncode == 2
    assert "requires a client certificate" in result.stderr
