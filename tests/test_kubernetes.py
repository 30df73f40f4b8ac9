"""The Kubernetes manifests (deploy/kubernetes): they render with kustomize, every object
validates against the Kubernetes API schemas (kubernetes-validate, offline), and the DaemonSet
has what a per-node GPU daemon needs. Skipped, saying why, where kubectl or kubernetes-validate
is missing (.ci/run provides both)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"


def _render(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (Debian: apt-get install kubectl); .ci/run has it")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind]
    return found


def test_the_base_renders_and_every_object_validates() -> None:
    objects = _render(DEPLOY)
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "DaemonSet", "Namespace", "Service"]
    validator = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed; .ci/run has it"
    )
    version = validator.latest_version()
    for resource in objects:
        validator.validate(resource, version, strict=True)


def test_the_daemonset_is_a_per_node_gpu_daemon() -> None:
    objects = _render(DEPLOY)
    daemonset = _one(objects, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostPID"] is True  # pids as NVML reports them
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    [daemon] = pod["containers"]
    assert daemon["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert daemon["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert daemon["ports"][0]["hostPort"] == 8700
    assert daemon["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in daemon["env"]}
    assert env["MODEL_REGISTRY_HOST_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["MODEL_REGISTRY_ADVERTISE_URL"]["value"] == "http://$(NODE_IP):8700"
    assert env["MODEL_REGISTRY_SCHEDULER_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/model-registry"
    mounts = {m["name"]: m["mountPath"] for m in daemon["volumeMounts"]}
    assert mounts["state"] == "/var/lib/model-registry"
    [owner] = pod["initContainers"]  # gives the hostPath to the image's user
    assert "chown 999:999 /var/lib/model-registry" in " ".join(owner["command"])
    service = _one(objects, "Service")
    assert service["spec"]["clusterIP"] == "None"  # discovery, never load balancing
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        "model-registry"
    }


def test_monitoring_adds_a_service_monitor_and_the_alert_rules_as_they_are() -> None:
    objects = _render(DEPLOY / "monitoring")
    rule = _one(objects, "PrometheusRule")
    alerts = yaml.safe_load((ROOT / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == alerts  # the same rules, not a copy that drifts
    monitor = _one(objects, "ServiceMonitor")
    service = _one(objects, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert service["metadata"]["name"] == "model-registry"  # the job label the rules expect
    assert {rule["metadata"]["namespace"], monitor["metadata"]["namespace"]} == {"model-registry"}
