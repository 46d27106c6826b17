"""deploy/helm/fedlink: `helm lint --strict` passes and `helm template` renders a coordinator
StatefulSet with its state on a PersistentVolumeClaim, certificates from Secrets, and one client
Job per site with only its own Secret, all over mTLS as the unprivileged image user.

Helm runs as the `helm` binary when it is on PATH, else through helm-python-sdk (the `dev`
extra: Helm's own Go SDK, the code `helm lint` and `helm template` run, in a wheel)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "fedlink"
RELEASE = "demo"
COORDINATOR = f"{RELEASE}-fedlink-coordinator"


def _sdk() -> Any:
    try:
        import helm_python
    except (ImportError, OSError) as exc:  # OSError: the bundled library does not load
        if shutil.which("helm") is None:
            pytest.skip(
                f"neither a helm binary nor helm-python-sdk ({exc}); install the dev extra: "
                "pip install -e '.[dev]'"
            )
        return None
    return helm_python


def _lint(values: dict[str, Any] | None = None) -> list[str]:
    """Warnings and errors of `helm lint --strict` (informational messages left out)."""
    binary = shutil.which("helm")
    if binary is not None:
        command = [binary, "lint", "--strict", str(CHART)]
        if values is not None:
            command += ["--set-json", *(f"{k}={json.dumps(v)}" for k, v in values.items())]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        problems = [line for line in result.stdout.splitlines() if "[WARNING]" in line]
        problems += [line for line in result.stdout.splitlines() if "[ERROR]" in line]
        return problems if result.returncode == 0 else [*problems, result.stderr or "failed"]
    report = _sdk().lint(str(CHART), values, strict=True)
    return [*report["errors"], *(m["error"] for m in report["messages"] if m["severity"] >= 2)]


def _template(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm template demo deploy/helm/fedlink`, as the Kubernetes objects it renders."""
    binary = shutil.which("helm")
    if binary is not None:
        command = [binary, "template", RELEASE, str(CHART)]
        if values is not None:
            command += ["--set-json", *(f"{k}={json.dumps(v)}" for k, v in values.items())]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
        text = result.stdout
    else:
        with _sdk().Chart.load(str(CHART)) as chart:
            rendered = chart.render(values, name=RELEASE, namespace="default", is_install=True)
        text = "\n---\n".join(v for k, v in rendered.items() if k.endswith(".yaml"))
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def test_helm_lint_is_clean() -> None:
    _sdk()
    assert _lint() == []
    assert _lint({"clients": [], "coordinator": {"healthProbe": False}}) == []


def test_the_coordinator_is_a_statefulset_with_its_state_on_a_volume_claim() -> None:
    _sdk()
    objects = _template()
    (statefulset,) = _kinds(objects, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    pod = _pod(statefulset)
    (container,) = pod["containers"]
    assert container["args"] == ["server"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == "/var/lib/fedlink"
    env = _env(container)
    assert env["FEDLINK_STATE_DIR"].startswith("/var/lib/fedlink/")
    assert env["FEDLINK_RUN_DIR"].startswith("/var/lib/fedlink/")
    assert env["FEDLINK_NUM_ROUNDS"] == "10" and env["FEDLINK_TASK"] == "digits"
    assert container["readinessProbe"]["exec"]["command"] == ["fedlink", "health"]
    assert env["FEDLINK_HEALTH_SERVER_NAME"] == COORDINATOR  # what its certificate names
    (service,) = _kinds(objects, "Service")
    assert service["metadata"]["name"] == COORDINATOR
    assert (
        service["spec"]["selector"].items()
        <= statefulset["spec"]["template"]["metadata"]["labels"].items()
    )


def test_certificates_come_from_secrets_and_nothing_runs_without_tls_or_as_root() -> None:
    _sdk()
    objects = _template()
    workloads = [*_kinds(objects, "StatefulSet"), *_kinds(objects, "Job")]
    assert len(workloads) == 4
    for workload in workloads:
        pod = _pod(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001  # the image's fedlink user
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        env = _env(container)
        assert {env["FEDLINK_CERT"], env["FEDLINK_KEY"], env["FEDLINK_CA"]} == {
            "/certs/tls.crt",
            "/certs/tls.key",
            "/certs/ca.crt",
        }
        (certs,) = [v for v in pod["volumes"] if v["name"] == "certs"]
        assert "secret" in certs
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == "certs"]
        assert mount["readOnly"] is True and mount["mountPath"] == "/certs"
    rendered = json.dumps(objects).lower()
    assert "insecure" not in rendered
    assert "ca.key" not in rendered  # the CA's key never enters the cluster


def test_each_client_job_has_only_its_own_secret_and_dials_the_coordinator() -> None:
    _sdk()
    jobs = _kinds(_template(), "Job")
    assert [j["metadata"]["name"] for j in jobs] == [
        f"{RELEASE}-fedlink-client-{i}" for i in (1, 2, 3)
    ]
    for i, job in enumerate(jobs, start=1):
        pod = _pod(job)
        assert pod["restartPolicy"] == "Never"
        (certs,) = pod["volumes"]
        assert certs["secret"]["secretName"] == f"fedlink-client-{i}"
        (container,) = pod["containers"]
        assert container["args"] == ["client"]
        env = _env(container)
        assert env["FEDLINK_SERVER"] == f"{COORDINATOR}:50051"
        assert env["FEDLINK_PARTITION_INDEX"] == str(i - 1)
        # A refusal (exit 2) fails the Job at once instead of being retried.
        (rule,) = job["spec"]["podFailurePolicy"]["rules"]
        assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]


def test_values_add_sites_and_settings() -> None:
    _sdk()
    objects = _template(
        {
            "clients": [
                {"name": f"site-{i}", "certificateSecret": f"site-{i}-bundle", "env": {}}
                for i in range(5)
            ],
            "coordinator": {
                "env": {"FEDLINK_NUM_ROUNDS": "3", "FEDLINK_MIN_FIT_CLIENTS": "5"},
                "healthProbe": False,
                "persistence": {"size": "5Gi", "storageClassName": "fast"},
                "certificateSecret": "coordinator-bundle",
            },
        }
    )
    jobs = _kinds(objects, "Job")
    assert [_pod(j)["volumes"][0]["secret"]["secretName"] for j in jobs] == [
        f"site-{i}-bundle" for i in range(5)
    ]
    (statefulset,) = _kinds(objects, "StatefulSet")
    (container,) = _pod(statefulset)["containers"]
    env = _env(container)
    assert env["FEDLINK_NUM_ROUNDS"] == "3" and env["FEDLINK_MIN_FIT_CLIENTS"] == "5"
    assert "readinessProbe" not in container and "FEDLINK_HEALTH_CERT" not in env
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["storageClassName"] == "fast"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi"
    (certs,) = _pod(statefulset)["volumes"]
    assert certs["secret"]["secretName"] == "coordinator-bundle"
