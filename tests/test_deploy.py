"""Deployment files: Kubernetes manifests against the API schema, compose on loopback only."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from common.alerts import load_alert_settings
from common.prometheus import load_monitoring_settings
from scripts.container import load_container_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = ["deployment.yaml", "service.yaml", "hpa.yaml"]


def manifest(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return data


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_the_kubernetes_schema(name: str) -> None:
    kubernetes_validate.validate(manifest(name), kubernetes_validate.latest_version(), strict=True)


def test_schema_check_can_fail() -> None:
    broken = copy.deepcopy(manifest("deployment.yaml"))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)


def test_deployment_probes_resources_and_service_wiring() -> None:
    deployment = manifest("deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (main,) = pod["containers"]
    assert main["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"cpu", "memory"} <= set(main["resources"]["requests"])
    assert {"cpu", "memory"} <= set(main["resources"]["limits"])
    port = main["ports"][0]
    assert port["containerPort"] == load_container_settings().smoke.container_port
    assert pod["securityContext"]["runAsNonRoot"] is True
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = manifest("service.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    hpa = manifest("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_pods_invite_prometheus_to_scrape_their_metrics() -> None:
    """The prometheus.io annotations point at the container's port and the service's /metrics."""
    template = manifest("deployment.yaml")["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    (main,) = template["spec"]["containers"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(main["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == load_monitoring_settings().scrape.metrics_path


def test_prometheus_rule_is_generated_and_kept_out_of_the_kustomization() -> None:
    """The PrometheusRule needs the Prometheus Operator's CRD, so it is applied on its own."""
    rule = manifest("prometheusrule.yaml")
    settings = load_alert_settings()
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["metadata"]["name"] == settings.prometheus.k8s_name
    assert rule["metadata"]["labels"] == settings.prometheus.k8s_labels
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "prometheusrule.yaml" not in kustomization["resources"]


@pytest.mark.parametrize("name", ["docker-compose.yaml", "docker-compose.postgres.yaml"])
def test_compose_publishes_on_loopback_only(name: str) -> None:
    services = yaml.safe_load((ROOT / name).read_text())["services"]
    published = [port for svc in services.values() for port in svc.get("ports", [])]
    assert all(str(port).startswith("127.0.0.1:") for port in published)


def test_compose_mlflow_keeps_its_store_and_admits_the_compose_network() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    mlflow = compose["services"]["mlflow"]
    assert any(volume.endswith(":/mlflow") for volume in mlflow["volumes"])
    allowed = next(arg for arg in mlflow["command"] if arg.startswith("--allowed-hosts="))
    assert "mlflow:*" in allowed
    assert "sqlite:////mlflow/" in " ".join(mlflow["command"])


def test_compose_api_is_given_no_mlflow_settings() -> None:
    """The image carries its model and never imports MLflow: no tracking URI it would not use."""
    for name in ["docker-compose.yaml", "docker-compose.postgres.yaml"]:
        services = yaml.safe_load((ROOT / name).read_text())["services"]
        api_env = services.get("api", {}).get("environment", {})
        assert not [key for key in api_env if key.startswith("MLFLOW_")], name


def test_postgres_override_stays_inside_and_feeds_mlflow() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.postgres.yaml").read_text())["services"]
    assert "ports" not in services["postgres"]
    uri = next(a for a in services["mlflow"]["command"] if a.startswith("--backend-store-uri="))
    assert uri.startswith("--backend-store-uri=postgresql://") and "@postgres:5432/" in uri
