"""The multi-replica deployment fits together: registry, router and replicas in deploy/k8s and docker-compose.

Each manifest is validated strictly by tests/test_deploy.py; here, the wiring between them, and HAProxy's
check of both router configurations (skipped without `haproxy`). No cluster or image build.
"""

from __future__ import annotations

import shutil
import subprocess
from urllib.parse import urlparse

import pytest
import yaml

from testing.process import REPO_ROOT
from testing.router import CONFIG

DEPLOY = REPO_ROOT / "deploy"
BACKEND_DIRECTIVES = (
    "balance hash req.body,json_query('$.model')",
    "hash-type consistent",
    "hash-balance-factor 125",
    "option http-buffer-request",
    "option httpchk GET /ready",
    "retry-on conn-failure empty-response",
)


def _k8s() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            if d:
                docs[(d["kind"], d["metadata"]["name"])] = d
    return docs


def _haproxy_check(text: str, tmp_path) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (scripts/install_system.sh installs Debian's `haproxy`)")
    path = tmp_path / "haproxy.cfg"
    path.write_text(text)
    r = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_k8s_replicas_reach_the_registry_through_its_secret_and_service():
    docs = _k8s()
    server = docs[("Deployment", "qserve")]["spec"]["template"]["spec"]["containers"][0]
    ref = next(e for e in server["env"] if e["name"] == "QSERVE_REGISTRY_URL")["valueFrom"]["secretKeyRef"]
    secret = docs[("Secret", ref["name"])]
    url = urlparse(secret["stringData"][ref["key"]])
    service = docs[("Service", url.hostname)]
    assert url.scheme == "postgresql" and url.port == service["spec"]["ports"][0]["port"] == 5432
    database = docs[("StatefulSet", url.hostname)]["spec"]
    assert service["spec"]["selector"] == database["selector"]["matchLabels"]
    postgres = database["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in postgres["env"]}
    assert env["POSTGRES_USER"]["value"] == url.username and env["POSTGRES_DB"]["value"] == url.path.lstrip("/")
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == ref["name"]
    assert secret["stringData"][env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"]] == url.password
    assert database["volumeClaimTemplates"], "the registry needs its own volume"


def test_k8s_clients_reach_the_router_and_the_router_finds_the_replicas(tmp_path):
    docs = _k8s()
    replicas_pod = docs[("Deployment", "qserve")]["spec"]["template"]["metadata"]["labels"]
    router_pod = docs[("Deployment", "qserve-router")]["spec"]["template"]["metadata"]["labels"]
    assert docs[("Service", "qserve")]["spec"]["selector"].items() <= router_pod.items()  # clients -> router
    headless = docs[("Service", "qserve-replicas")]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"].items() <= replicas_pod.items()
    config = docs[("ConfigMap", "qserve-router")]["data"]["haproxy.cfg"]
    assert "qserve-replicas." in next(line for line in config.splitlines() if "server-template" in line)
    for directive in BACKEND_DIRECTIVES:  # the same routing as the compose file's (and the tests')
        assert directive in config and directive in CONFIG.read_text()
    volume = docs[("Deployment", "qserve-router")]["spec"]["template"]["spec"]["volumes"][0]
    assert volume["configMap"]["name"] == "qserve-router"
    _haproxy_check(config, tmp_path)


def test_compose_wires_replicas_registry_and_router(tmp_path):
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    server, registry, router = services["server"], services["registry"], services["router"]
    url = urlparse(server["environment"]["QSERVE_REGISTRY_URL"])
    assert url.hostname == "registry" and url.port == 5432
    assert registry["environment"]["POSTGRES_USER"] == url.username
    assert registry["environment"]["POSTGRES_PASSWORD"] == url.password
    assert server["depends_on"]["registry"]["condition"] == "service_healthy"
    assert server["deploy"]["replicas"] >= 2 and "ports" not in server  # reached through the router only
    assert router["ports"] == ["8000:8000"]
    mount = next(v for v in router["volumes"] if v.startswith("./haproxy:"))
    assert (DEPLOY / "haproxy" / "haproxy.cfg").is_file() and mount.split(":")[1] == "/usr/local/etc/haproxy"
    assert "server-template replica 8 server:8000" in CONFIG.read_text()  # compose's DNS name for every replica
    _haproxy_check(CONFIG.read_text(), tmp_path)
