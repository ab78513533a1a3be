"""The Kubernetes manifests (deploy/k8s): every overlay builds and passes kubeconform -strict
against the pinned Kubernetes schemas, offline (`make k8s-validate`); a misspelt field fails it;
and what no schema knows: probes, drain, replicas, security context, settings' names."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
# Used only in the manifests, inside the DATABASE_URL each container composes.
MANIFEST_ONLY_VARIABLES = {"POSTGRES_ADDRESS", "POSTGRES_DATABASE"}


def validate(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "k8s.sh"), "validate", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def build(overlay: str, tmp_path: Path) -> list[dict[str, Any]]:
    """The overlay's objects, with placeholder files standing in for its secrets."""
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work, ignore=shutil.ignore_patterns("secrets"))
    kustomization = (work / "overlays" / overlay / "kustomization.yaml").read_text()
    (work / "overlays" / overlay / "secrets").mkdir()
    for name in set(re.findall(r"secrets/([\w.-]+)", kustomization)):
        (work / "overlays" / overlay / "secrets" / name).write_text("placeholder")
    built = subprocess.run(
        [str(REPO / ".local" / "bin" / "kustomize"), "build", str(work / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [item for item in yaml.safe_load_all(built.stdout) if item]


def of_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {item["metadata"]["name"]: item for item in objects if item["kind"] == kind}


def settings(objects: list[dict[str, Any]]) -> dict[str, str]:
    (config_map,) = [
        item
        for name, item in of_kind(objects, "ConfigMap").items()
        if name.startswith("ecommerce-settings")
    ]
    data: dict[str, str] = config_map["data"]
    return data


def test_the_base_and_every_overlay_pass_kubeconform_strict() -> None:
    result = validate(K8S)
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = [line for line in result.stdout.splitlines() if line.startswith("Summary:")]
    assert len(summaries) == 1 + len(OVERLAYS), result.stdout
    for summary in summaries:
        assert "Invalid: 0, Errors: 0, Skipped: 0" in summary, summary


@pytest.mark.parametrize(
    ("good", "bad", "complaint"),
    [
        # A misspelt field: -strict refuses what the schema does not have.
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
            "additional properties 'readOnlyRootFileSystem' not allowed",
        ),
        # A value of the wrong type.
        ("terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: thirty", "want"),
    ],
)
def test_an_invalid_manifest_fails_validation(
    tmp_path: Path, good: str, bad: str, complaint: str
) -> None:
    work = tmp_path / "k8s"
    shutil.copytree(K8S, work, ignore=shutil.ignore_patterns("secrets"))
    processor = work / "base" / "processor.yaml"
    assert good in processor.read_text()
    processor.write_text(processor.read_text().replace(good, bad, 1))
    result = validate(work)
    assert result.returncode != 0
    assert complaint in result.stdout, result.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_what_the_schemas_do_not_check(overlay: str, tmp_path: Path) -> None:
    objects = build(overlay, tmp_path)
    config = settings(objects)
    deployments = of_kind(objects, "Deployment")
    assert set(deployments) == {"user-service", "order-service", "processor"}
    # A consumer group gives each partition to one member: more processors would sit idle.
    assert deployments["processor"]["spec"]["replicas"] <= int(config["KAFKA_TOPIC_PARTITIONS"])
    assert int(config["KAFKA_REPLICATION_FACTOR"]) >= 3
    budgets = {
        tuple(budget["spec"]["selector"]["matchLabels"].items())
        for budget in of_kind(objects, "PodDisruptionBudget").values()
    }
    for name, deployment in deployments.items():
        spec = deployment["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        # Longer than the preStop pause plus the drain SIGTERM starts.
        pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] > pause + float(
            config["SHUTDOWN_GRACE_SECONDS"]
        ), name
        assert tuple(deployment["spec"]["selector"]["matchLabels"].items()) in budgets, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert container["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }, name
        assert {"requests", "limits"} <= set(container["resources"]), name
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["metrics"] == int(_env(container, "METRICS_PORT")), name
        # The probes ask the gRPC port this container listens on (mutual TLS: an exec check).
        grpc_port = next(port for key, port in ports.items() if key.startswith("grpc"))
        for probe in ("readinessProbe", "livenessProbe"):
            command = " ".join(container[probe]["exec"]["command"])
            assert str(grpc_port) in command, (name, probe, command)
    # The services are headless: clients balance calls over the pods (dns:/// + round_robin).
    for name, service in of_kind(objects, "Service").items():
        assert service["spec"]["clusterIP"] == "None", name
    assert "order-service:" in _env(
        deployments["processor"]["spec"]["template"]["spec"]["containers"][0],
        "ORDER_SERVICE_ADDRESS",
    )


def _env(container: dict[str, Any], name: str) -> str:
    (value,) = [item["value"] for item in container["env"] if item["name"] == name]
    return str(value)


def test_every_variable_the_manifests_set_is_a_documented_setting(tmp_path: Path) -> None:
    objects = build(OVERLAYS[0], tmp_path)
    names = set(settings(objects))
    for item in objects:
        if item["kind"] in {"Deployment", "Job"}:
            for container in item["spec"]["template"]["spec"]["containers"]:
                names |= {variable["name"] for variable in container.get("env", [])}
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", (REPO / "README.md").read_text()))
    assert names - MANIFEST_ONLY_VARIABLES - documented == set()
