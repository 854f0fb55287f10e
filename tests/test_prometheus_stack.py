"""A real Prometheus scrapes the running server: per-adapter acceptance rate and TTFT read back through
its HTTP API match the server's own /metrics; every Grafana panel's query returns data; promtool
accepts the deploy/prometheus files."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from testing.process import REPO_ROOT, free_port
from tests.conftest import ADAPTERS, LOG_DIR, MODEL
from tests.promtext import buckets, by_label, histogram_quantile, scrape

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None, reason="needs Debian's prometheus (scripts/install_system.sh)"
)

DEPLOY = REPO_ROOT / "deploy" / "prometheus"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "qserve-dashboard.json"
WAIT_S = 60.0  # bound on every wait for Prometheus


def test_promtool_accepts_config_and_rules():
    for args in (["check", "config", str(DEPLOY / "prometheus.yml")], ["check", "rules", str(DEPLOY / "alerts.yml")],
                 ["test", "rules", str(DEPLOY / "alerts_test.yml")]):  # fmt: skip
        r = subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=DEPLOY)
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def prometheus(base_url):
    """Prometheus with deploy/prometheus's config and rules, scraping the default server every second."""
    work = Path(tempfile.mkdtemp(prefix="qserve-prom-"))
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(DEPLOY / "alerts.yml")]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [base_url.removeprefix("http://")]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = open(LOG_DIR / "prometheus.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={work / 'prometheus.yml'}",
            f"--storage.tsdb.path={work / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],  # fmt: skip
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: httpx.get(url + "/-/ready", timeout=2).status_code == 200, "Prometheus ready")
        _wait(lambda: _query(url, "up") == [1.0], "first scrape of the server")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def traffic(base_url, prometheus, prompts):
    """Requests for the two adapters (and one for an unknown model), then the server's /metrics once
    Prometheus has scraped the final counts."""
    # The 404 first: its error series then exists for several scrapes, so rate() over it has data
    # even when this module runs alone.
    assert (
        httpx.post(base_url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30).status_code == 404
    )
    for i in range(8):
        model = ADAPTERS[i % 2]
        body = {"model": model, "prompt": prompts[i], "max_tokens": 24, "temperature": (0.0, 1.0)[i // 2 % 2]}
        assert httpx.post(base_url + "/v1/completions", json=body, timeout=120).status_code == 200
    assert (
        httpx.post(
            base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4}, timeout=120
        ).status_code
        == 200
    )
    served = scrape(base_url)
    draft = by_label(served, "qserve_spec_decode_draft_tokens_total")
    _wait(
        lambda: _by_adapter(prometheus, "sum by (adapter) (qserve_spec_decode_draft_tokens_total)") == draft,
        "Prometheus to hold the final counts",
    )
    return served


@pytest.mark.engine
def test_prometheus_reads_back_per_adapter_acceptance_and_ttft(prometheus, traffic):
    served = traffic
    accepted = by_label(served, "qserve_spec_decode_accepted_tokens_total")
    draft = by_label(served, "qserve_spec_decode_draft_tokens_total")
    rate = _by_adapter(
        prometheus,
        "sum by (adapter) (qserve_spec_decode_accepted_tokens_total) / sum by (adapter) (qserve_spec_decode_draft_tokens_total)",
    )
    for adapter in ADAPTERS:
        assert draft[adapter] > 0
        assert rate[adapter] == pytest.approx(accepted[adapter] / draft[adapter], rel=1e-12), adapter
        for q in (0.5, 0.95):
            ours = histogram_quantile(q, buckets(served, "qserve_time_to_first_token_seconds", adapter))
            prom = _by_adapter(
                prometheus, f"histogram_quantile({q}, sum by (le, adapter) (qserve_time_to_first_token_seconds_bucket))"
            )
            assert 0 < ours < 600 and prom[adapter] == pytest.approx(ours, rel=1e-9), (adapter, q)
        print(f"{adapter}: acceptance rate {rate[adapter]:.3f} ({accepted[adapter]:.0f}/{draft[adapter]:.0f}), "
              f"TTFT p50 {histogram_quantile(0.5, buckets(served, 'qserve_time_to_first_token_seconds', adapter)):.3f} s")  # fmt: skip
    # The alert rule's windowed form gives a rate in [0, 1] for each adapter.
    windowed = _by_adapter(
        prometheus,
        "sum by (adapter) (rate(qserve_spec_decode_accepted_tokens_total[5m])) / sum by (adapter) (rate(qserve_spec_decode_draft_tokens_total[5m]))",
    )
    assert all(0 <= windowed[a] <= 1 for a in ADAPTERS), windowed


@pytest.mark.engine
def test_every_grafana_panel_query_returns_data(prometheus, traffic):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"]
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "5m")
            values = [v for v in _query(prometheus, expr) if not math.isnan(v)]
            if not values:
                empty.append((panel["title"], expr))
    assert not empty, empty


def _query(url: str, expr: str) -> list[float]:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", r
    return [float(s["value"][1]) for s in r["data"]["result"]]


def _by_adapter(url: str, expr: str) -> dict[str, float]:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", r
    return {s["metric"].get("adapter", ""): float(s["value"][1]) for s in r["data"]["result"]}


def _wait(check, what: str) -> None:
    """Poll ``check`` every 0.5 s for at most WAIT_S seconds (a bound, not an assertion on speed)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what} after {WAIT_S:.0f} s")
