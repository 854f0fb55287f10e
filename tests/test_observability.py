"""Per-adapter metrics: definitions, the label cap, break-even math, and sums that equal vLLM's own counters."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from bench.serving_bench import spec_counters
from server.engine.observed import spec_summary
from server.metrics import BASE_LABEL, OTHER_LABEL, AdapterLabels
from server.speculation.cost import CostModel
from server.speculation.speedup import break_even_acceptance, expected_tokens, speedup
from testing.process import REPO_ROOT
from tests.conftest import ADAPTERS, MODEL
from tests.promtext import by_label, scrape, total

SPEC = "qserve_spec_decode_"


def test_adapter_label_cap_keeps_first_names_and_folds_the_rest():
    labels = AdapterLabels(cap=2)
    assert [labels(n) for n in ("a", "b", "c", "a", None, "d", "b")] == ["a", "b", OTHER_LABEL, "a", BASE_LABEL,
                                                                        OTHER_LABEL, "b"]  # fmt: skip


def test_spec_summary_from_vllm_histogram():
    # k = 4; steps accepting 0, 2, 4, 4 and 1 draft tokens.
    s = spec_summary([1, 1, 1, 0, 2], num_draft_tokens=20)
    assert s == {"draft_tokens": 20, "accepted_tokens": 11, "steps": 5, "accepted_per_pos": [4, 3, 2, 2]}


def test_break_even_acceptance_matches_the_alert_rule():
    a = break_even_acceptance(k=4, c=0.372)  # per-token acceptance (Leviathan's alpha) at speedup 1
    assert speedup(a, 4, 0.372) == pytest.approx(1.0, abs=1e-9)
    assert 1 + a + a**2 + a**3 + a**4 == pytest.approx(4 * 0.372 + 1)
    assert speedup(a - 0.01, 4, 0.372) < 1 < speedup(a + 0.01, 4, 0.372)
    assert break_even_acceptance(4, 0.0) == 0.0 and break_even_acceptance(1, 1.5) == 1.0
    # What the alert compares is accepted / draft tokens = (E - 1) / k: at speedup 1 that is c for any k
    # (E = 1 + k c), which CostModel.break_even_acceptance gives with Leviathan's cost (t1 = d1 = 0)
    for k in (1, 2, 4):
        assert CostModel(t0=1.0, t1=0.0, d0=0.372, d1=0.0).break_even_acceptance(k) == pytest.approx(0.372)
        assert (expected_tokens(break_even_acceptance(k, 0.372), k) - 1) / k == pytest.approx(0.372, abs=1e-9)
    rules = (REPO_ROOT / "deploy/prometheus/alerts.yml").read_text()
    assert (
        "< on (model, requests) group_left () max by (model, requests) (qserve_speculation_break_even_acceptance)"
        in rules
    )
    grafana = (REPO_ROOT / "deploy/grafana/qserve-dashboard.json").read_text()
    assert "max by (model, requests) (qserve_speculation_break_even_acceptance)" in grafana


@pytest.mark.engine
def test_per_adapter_sums_equal_vllm_engine_counters(base_url, prompts):
    """Streamed and non-streamed, greedy and sampled requests on the base and both adapters."""
    before, vllm_before = scrape(base_url), spec_counters(base_url)
    pos_before = _vllm_per_pos(before)
    expected: dict[str, dict[str, float]] = {}
    jobs = []
    for i, model in enumerate([MODEL, *ADAPTERS] * 3):
        body = {"model": model, "prompt": prompts[i], "max_tokens": 24, "temperature": (0.0, 1.0)[i % 2]}
        jobs.append((BASE_LABEL if model == MODEL else model, body, i // 3 == 1))  # the second round streams

    def send(job):
        adapter, body, stream = job
        if stream:
            return adapter, _stream(base_url, body), None
        r = httpx.post(base_url + "/v1/completions", json=body, timeout=120).json()
        return adapter, r["usage"], r["metrics"]["speculative_decoding"]

    with ThreadPoolExecutor(4) as pool:  # adapters and the base share batches
        results = list(pool.map(send, jobs))
    for adapter, usage, sd in results:
        e = expected.setdefault(adapter, {"requests": 0, "prompt": 0, "gen": 0, "draft": 0, "accepted": 0, "steps": 0})
        e["requests"] += 1
        e["prompt"] += usage["prompt_tokens"]
        e["gen"] += usage["completion_tokens"]
        if sd is not None:
            e["draft"] += sd["num_draft_tokens"]
            e["accepted"] += sd["num_accepted_draft_tokens"]
            e["steps"] += sd["num_spec_steps"]
    after, vllm_after = scrape(base_url), spec_counters(base_url)

    def delta(name: str, adapter: str) -> float:
        return total(after, name, adapter=adapter) - total(before, name, adapter=adapter)

    for adapter, e in expected.items():
        assert delta("qserve_requests_finished_total", adapter) == e["requests"], adapter
        assert delta("qserve_prompt_tokens_total", adapter) == e["prompt"], adapter
        assert delta("qserve_generation_tokens_total", adapter) == e["gen"], adapter
        assert delta("qserve_time_to_first_token_seconds_count", adapter) == e["requests"], adapter
        assert delta("qserve_e2e_request_latency_seconds_count", adapter) == e["requests"], adapter
        # The non-streamed half, as vLLM reported it in each response, is part of what we counted.
        assert delta(SPEC + "draft_tokens_total", adapter) >= e["draft"] > 0, adapter
        assert delta(SPEC + "steps_total", adapter) >= e["steps"] > 0, adapter
    ours = {
        n: sum(delta(SPEC + n, a) for a in expected)
        for n in ("draft_tokens_total", "accepted_tokens_total", "steps_total")
    }
    vllm = {k: vllm_after[k] - vllm_before[k] for k in vllm_after}
    assert ours["draft_tokens_total"] == vllm["num_draft_tokens"] > 0
    assert ours["accepted_tokens_total"] == vllm["num_accepted_tokens"] > 0
    assert ours["steps_total"] == vllm["num_drafts"] > 0
    pos_after = _vllm_per_pos(after)
    for pos in pos_after:
        ours_pos = total(after, SPEC + "accepted_tokens_per_pos_total", position=pos) - total(
            before, SPEC + "accepted_tokens_per_pos_total", position=pos
        )
        assert ours_pos == pos_after[pos] - pos_before.get(pos, 0.0), pos
    print(
        "per-adapter draft/accepted:",
        {a: (delta(SPEC + "draft_tokens_total", a), delta(SPEC + "accepted_tokens_total", a)) for a in expected},
    )


@pytest.mark.engine
def test_client_disconnect_counts_as_aborted(base_url, prompts):
    aborted = {"adapter": "austen", "status": "aborted"}
    before = total(scrape(base_url), "qserve_requests_finished_total", **aborted)
    body = {"model": "austen", "prompt": prompts[1], "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # the first tokens came; hang up
    deadline = time.monotonic() + 60  # a bound on the wait, not a timing assertion
    while (
        total(scrape(base_url), "qserve_requests_finished_total", **aborted) == before and time.monotonic() < deadline
    ):
        time.sleep(0.5)
    after = scrape(base_url)
    assert total(after, "qserve_requests_finished_total", **aborted) == before + 1
    assert total(after, "qserve_requests_in_flight", adapter="austen") == 0


@pytest.mark.engine
def test_errors_are_counted_by_type(base_url):
    before = total(scrape(base_url), "qserve_errors_total", type="not_found_error", status="404")
    r = httpx.post(base_url + "/v1/completions", json={"model": "no-such-adapter", "prompt": "x"}, timeout=30)
    assert r.status_code == 404
    assert total(scrape(base_url), "qserve_errors_total", type="not_found_error", status="404") == before + 1


@pytest.mark.engine
def test_adapter_events_and_residency(base_url):
    """Uploading more adapter versions than the engine's LoRA cache holds (max_loras=4) evicts the oldest."""
    files = [
        ("files", (f.name, f.read_bytes())) for f in sorted((REPO_ROOT / "adapters/demo/austen").glob("adapter_*"))
    ]
    before = scrape(base_url)
    for _ in range(3):  # three new versions = three new engine ids
        r = httpx.post(base_url + "/v1/adapters", data={"name": "obs-copy"}, files=files, timeout=120)
        assert r.status_code in (200, 201), r.text
    mid = scrape(base_url)
    assert httpx.delete(base_url + "/v1/adapters/obs-copy", timeout=30).status_code == 200
    after = scrape(base_url)
    events = {e: total(after, "qserve_adapter_events_total", event=e) - total(before, "qserve_adapter_events_total", event=e)
              for e in ("upload", "load", "delete")}  # fmt: skip
    assert events == {"upload": 3, "load": 3, "delete": 1}
    assert total(mid, "qserve_adapters_served") == total(before, "qserve_adapters_served") + 1
    assert total(after, "qserve_adapters_served") == total(before, "qserve_adapters_served")
    loads, reloads, evictions = (
        total(after, "qserve_adapter_events_total", event=e) for e in ("load", "reload", "eviction")
    )
    resident = total(after, "qserve_adapters_resident")
    assert 1 <= resident <= 4
    assert loads + reloads - evictions == resident  # every version in the engine got there by a load or reload
    assert evictions >= 1  # at least 2 seeded + 3 versions > 4 slots


def _stream(base_url: str, body: dict) -> dict:
    """POST a streamed completion; returns its usage (from the final chunk)."""
    usage = None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
    assert usage is not None
    return usage


def _vllm_per_pos(samples) -> dict[str, float]:
    return {
        lab["position"]: v
        for n, lab, v in samples
        if re.fullmatch(r"vllm:spec_decode_num_accepted_tokens_per_pos_total", n)
    }


def test_by_label_sums_per_value():
    samples = [("m_total", {"adapter": "a", "x": "1"}, 2.0), ("m_total", {"adapter": "a", "x": "2"}, 3.0),
               ("m_total", {"adapter": "b"}, 1.0)]  # fmt: skip
    assert by_label(samples, "m_total") == {"a": 5.0, "b": 1.0}
