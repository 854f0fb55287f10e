"""The load generator's smoke scenario against the shared server: its counts equal the server's /metrics deltas,
acceptance per model included."""

from __future__ import annotations

import pytest

from loadtests import report, runner, scenarios
from server.metrics import BASE_LABEL
from tests.promtext import scrape, total

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def smoke(server) -> dict:
    """One smoke run (8 streamed requests, 2 in flight, base + both shipped adapters), its report, and
    /metrics read here (not by the runner) just before and after it."""
    sc = scenarios.build("smoke", "demo-target", max_seconds=120)
    before = scrape(server.base_url)
    result = runner.run(server.base_url, sc.jobs, sc.load)
    rep = report.run_report(sc.name, {"mode": "concurrency", "value": 2}, result)
    return {"jobs": sc.jobs, "report": rep, "before": before, "after": scrape(server.base_url)}


def test_every_request_completes_and_is_counted_by_vllm(smoke):
    total, server = smoke["report"]["total"], smoke["report"]["server"]
    assert total["requests"] == len(smoke["jobs"]) == 8
    assert total["errors"] == 0 and server["cancelled"] == 0
    assert server["requests_success"] == total["completed"]
    assert server["generation_tokens"] == total["output_tokens"] == sum(j.output_len for j in smoke["jobs"])


def test_route_counts_match_our_http_metric(smoke):
    http = smoke["report"]["server"]["http"]
    by_api = {api: sum(j.api == api for j in smoke["jobs"]) for api in ("completions", "chat")}
    assert http.get("/v1/completions 200", 0) == by_api["completions"]
    assert http.get("/v1/chat/completions 200", 0) == by_api["chat"]


def test_per_model_breakdown_adds_up_and_acceptance_is_read(smoke):
    rep = smoke["report"]
    models = {j.model for j in smoke["jobs"]}
    assert set(rep["per_model"]) == models and len(models) > 1
    assert sum(s["completed"] for s in rep["per_model"].values()) == rep["total"]["completed"]
    assert 0.0 <= rep["server"]["acceptance_rate"] <= 1.0
    assert rep["server"]["spec_draft_tokens"] > 0
    assert all(p is not None for p in rep["total"]["ttft_ms"].values())


def test_acceptance_per_model_is_what_metrics_counted_for_its_adapter(smoke):
    def delta(name: str, **labels: str) -> float:
        return total(smoke["after"], name, **labels) - total(smoke["before"], name, **labels)

    for model, s in smoke["report"]["per_model"].items():
        adapter = BASE_LABEL if model == "demo-target" else model
        draft = delta("qserve_spec_decode_draft_tokens_total", adapter=adapter)
        accepted = delta("qserve_spec_decode_accepted_tokens_total", adapter=adapter)
        assert (s["spec_draft_tokens"], s["spec_accepted_tokens"]) == (draft, accepted), model
        assert draft > 0 and s["acceptance_rate"] == accepted / draft, model
    # Per model, the draft tokens add up to vLLM's engine-wide counter over the run.
    server = smoke["report"]["server"]
    vllm_draft = delta("vllm:spec_decode_num_draft_tokens_total")
    assert sum(e["draft_tokens"] for e in server["spec_per_model"].values()) == server["spec_draft_tokens"]
    assert sum(s["spec_draft_tokens"] for s in smoke["report"]["per_model"].values()) == vllm_draft
    assert server["spec_draft_tokens"] == vllm_draft


def test_targets_only_localhost():
    with pytest.raises(ValueError, match="127.0.0.1 only"):
        runner.check_local("http://example.com:8000")
