"""Deployment files are valid: Kubernetes manifests (kubernetes-validate), Prometheus rules (promtool),
the compose file's wiring, and the Dockerfile's non-root user and healthcheck. No cluster or image build."""

from __future__ import annotations

import re
import shutil
import subprocess

import kubernetes_validate
import pytest
import yaml

from server.settings import Settings
from testing.process import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"


def _manifests() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_kubernetes_manifests_validate_strictly(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises on any schema error


def test_kubernetes_pieces_fit_together():
    by_kind = {d["kind"]: d for d in _manifests()}
    by_kind["Deployment"] = next(
        d for d in _manifests() if d["kind"] == "Deployment" and d["metadata"]["name"] == "qserve"
    )
    assert {"Deployment", "Service", "PersistentVolumeClaim", "Secret", "ConfigMap", "HorizontalPodAutoscaler"} <= set(
        by_kind
    )
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["securityContext"]["runAsNonRoot"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {d["metadata"]["name"] for d in _manifests() if d["kind"] == "PersistentVolumeClaim"}
    assert {volumes[v]["persistentVolumeClaim"]["claimName"] for v in ("adapters", "merged")} == claims
    assert len(claims) == 2  # adapters and merged models each on their own claim
    assert volumes["keys"]["secret"]["secretName"] == by_kind["Secret"]["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    config = next(d for d in _manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "qserve-config")
    assert config["data"]["QSERVE_ADAPTER_STORE_DIR"] == mounts["adapters"]
    assert config["data"]["QSERVE_MERGED_MODELS_DIR"] == mounts["merged"]
    assert config["data"]["QSERVE_API_KEYS_FILE"].startswith(mounts["keys"] + "/")
    assert pod["terminationGracePeriodSeconds"] > int(config["data"]["QSERVE_SHUTDOWN_GRACE_S"])
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == by_kind["Deployment"]["metadata"]["name"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "qserve_requests_waiting"


def test_configmap_settings_are_real_settings():
    config = next(d for d in _manifests() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "qserve-config")
    known = {f"QSERVE_{name.upper()}" for name in Settings.model_fields}
    assert set(config["data"]) <= known, set(config["data"]) - known


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (scripts/install_system.sh installs the `prometheus` package)")
    return path


def test_recording_rules_pass_promtool():
    r = subprocess.run(
        [_promtool(), "check", "rules", str(K8S / "recording-rules.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.compose.yml"])
def test_prometheus_configs_pass_promtool(name):
    r = subprocess.run(
        [_promtool(), "check", "config", name], capture_output=True, text=True, cwd=DEPLOY / "prometheus"
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_wires_server_prometheus_grafana():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"server", "prometheus", "grafana"} <= set(services)
    server = services["server"]
    assert server["build"]["context"] == ".." and (DEPLOY / server["build"]["context"] / "Dockerfile").is_file()
    assert set(server["environment"]) <= {f"QSERVE_{n.upper()}" for n in Settings.model_fields}
    assert (
        server["secrets"] == ["api_keys"] and server["environment"]["QSERVE_API_KEYS_FILE"] == "/run/secrets/api_keys"
    )
    assert any(v.startswith("adapters:") for v in server["volumes"])
    assert (
        "merged:/data/merged" in server["volumes"]
        and server["environment"]["QSERVE_MERGED_MODELS_DIR"] == "/data/merged"
    )
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert (DEPLOY / "secrets" / "api_keys.example.txt").is_file()
    prometheus, grafana = services["prometheus"], services["grafana"]
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    mounts = {
        v.split(":")[1]: DEPLOY / v.split(":")[0]
        for v in prometheus["volumes"] + grafana["volumes"]
        if v.startswith("./")
    }
    assert (mounts["/etc/prometheus"] / config.removeprefix("/etc/prometheus/")).is_file()
    assert "server:8000" in (mounts["/etc/prometheus"] / config.removeprefix("/etc/prometheus/")).read_text()
    assert list(mounts["/var/lib/grafana/dashboards"].glob("*.json")), "no dashboard JSON mounted into Grafana"
    assert (mounts["/etc/grafana/provisioning"] / "datasources").is_dir()


def test_dockerfile_runs_non_root_with_a_health_check_and_both_variants():
    text = (REPO_ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*127\.0\.0\.1:8000/health", text, re.M)
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M) and 'pip install ".[${VARIANT}]"' in text
    assert re.search(r'^CMD \["python", "-m", "server"\]$', text, re.M)  # exec form: SIGTERM reaches python
