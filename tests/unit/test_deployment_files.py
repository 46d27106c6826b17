"""docker-compose.yml, the Dockerfile and the container part of docs/deployment.md: valid for
docker-compose, and secure the way the issue asks (mTLS everywhere, one identity per volume)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CLIENTS = ["client-1", "client-2", "client-3"]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in service.get("environment", {}).items()}


def _volumes(service: dict[str, Any]) -> dict[str, str]:
    """volume name -> mount point."""
    return dict(entry.split(":")[:2] for entry in service.get("volumes", []))


def _docker_compose(*arguments: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (CI installs Debian's docker-compose)")
    return subprocess.run(
        ["docker-compose", *arguments], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_docker_compose_accepts_the_file() -> None:
    result = _docker_compose("config", "-q")
    assert result.returncode == 0, result.stderr


def test_the_gpu_override_in_the_docs_is_valid_compose(tmp_path: Path) -> None:
    docs = (ROOT / "docs" / "deployment.md").read_text()
    (snippet,) = re.findall(r"^```yaml\n(.*?)^```$", docs, flags=re.MULTILINE | re.DOTALL)
    override = tmp_path / "docker-compose.override.yml"
    override.write_text(snippet)
    result = _docker_compose("-f", str(COMPOSE), "-f", str(override), "config")
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)["services"]["client-1"]
    (device,) = merged["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert merged["environment"]["FEDLINK_CERT"] == "/certs/client-1.pem"  # still its own


def test_nothing_runs_without_tls() -> None:
    assert "insecure" not in COMPOSE.read_text().lower()
    services = _compose()["services"]
    for name in ["server", *CLIENTS]:
        environment = _environment(services[name])
        assert {"FEDLINK_CERT", "FEDLINK_KEY", "FEDLINK_CA"} <= set(environment), name


def test_each_participant_mounts_only_its_own_certificates() -> None:
    services = _compose()["services"]
    certs = _volumes(services["certs"])
    assert set(certs) == {"ca", "coordinator-certs", *(f"{c}-certs" for c in CLIENTS)}
    assert set(services["certs"]["environment"]["CLIENTS"].split()) == set(CLIENTS)
    for name, volume in [("server", "coordinator-certs"), *((c, f"{c}-certs") for c in CLIENTS)]:
        mounted = [v for v in _volumes(services[name]) if v in certs]
        assert mounted == [volume], name
        assert f"{volume}:/certs:ro" in services[name]["volumes"], name
    for client in CLIENTS:
        environment = _environment(services[client])
        assert environment["FEDLINK_CERT"] == f"/certs/{client}.pem"
        assert environment["FEDLINK_SERVER"] == "server:50051"


def test_each_client_trains_on_its_own_partition() -> None:
    services = _compose()["services"]
    indices = sorted(int(_environment(services[c])["FEDLINK_PARTITION_INDEX"]) for c in CLIENTS)
    assert indices == list(range(len(CLIENTS)))
    assert {_environment(services[c])["FEDLINK_NUM_PARTITIONS"] for c in CLIENTS} == {"3"}


def test_startup_order_and_health() -> None:
    services = _compose()["services"]
    assert services["server"]["depends_on"]["certs"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["server"]["healthcheck"]["test"] == ["CMD", "fedlink", "health"]
    server_env = _environment(services["server"])
    assert server_env["FEDLINK_HEALTH_CERT"].startswith("/certs/")  # from its own volume
    assert "server-state" in _volumes(services["server"])
    for client in CLIENTS:
        # Never service_healthy: podman without systemd never runs healthchecks, so `up` would
        # hang; clients retry until the coordinator listens instead.
        assert services[client]["depends_on"]["server"]["condition"] == "service_started"
    assert "service_healthy" not in COMPOSE.read_text()


def test_the_image_runs_as_a_user_with_fedlink_as_entrypoint() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("\nFROM ") + dockerfile.startswith("FROM ") >= 2  # multi-stage
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert "\nUSER fedlink\n" in final_stage
    assert 'ENTRYPOINT ["fedlink"]' in final_stage
    assert 'CMD ["fedlink", "health"]' in final_stage
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile


def test_build_tools_and_bytecode_choices_stay_in_the_build_stage() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    build_stage, runtime_stage, final_stage = dockerfile.split("\nFROM ")[1:]
    # binutils, pip and the slimming happen where the image does not keep them.
    assert "binutils" in build_stage and "--strip-unneeded" in build_stage
    assert "pip uninstall -y -q pip" in build_stage
    for stage in (runtime_stage, final_stage):
        for tool in ("apt-get", "pip install", "binutils"):
            assert tool not in stage, tool
    assert "COPY --from=build /opt/fedlink /opt/fedlink" in runtime_stage
    # What the runtime stage deletes from the base is gone from the image, not hidden under a
    # later layer: the image is that stage's file system in one layer.
    assert final_stage.startswith("scratch\nCOPY --from=runtime / /\n")
    # The bytecode the build stage's demo wrote is where the image's Python looks for it.
    assert "PYTHONPYCACHEPREFIX=/opt/fedlink/pycache /opt/fedlink/bin/fedlink demo" in build_stage
    assert "PYTHONPYCACHEPREFIX=/opt/fedlink/pycache" in final_stage
