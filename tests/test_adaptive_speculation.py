"""Adaptive speculation (``--speculation-policy adaptive``, speculation.hooks.adaptive_k) through real servers.

Greedy output of a concurrent mixed batch equals a ``--no-speculation`` server's solo output (up to the
bf16 near-tie rule of tests/test_draft_lora.py), with requests of one step drafting different k; and
the policy acts: stdlib-docs's target adapter uploaded without its draft adapter (``nodraft``, acceptance
~0.03 on its own domain) ends up drafting less than the base.
"""

from __future__ import annotations

import concurrent.futures as cf
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, SHIPPED, launch, upload
from tests.promtext import scrape, total
from tests.test_draft_lora import complete, parting
from training.stdlib_text import split_docstrings, stdlib_docstrings

pytestmark = pytest.mark.engine
K_GAUGE, A_GAUGE = "qserve_speculation_k", "qserve_speculation_acceptance_estimate"


@pytest.fixture(scope="module")
def adaptive():
    # a cheap draft (d0 2 ms against t0 30): drafting pays even in a batch of 16, so its requests get different k;
    # the model stays as given (not refitted online from this host's steps, the adaptive policy's default)
    args = (
        "--speculation-policy",
        "adaptive",
        "--speculation-cost-ms",
        "30,0.4,2,0.05",
        "--no-speculation-cost-online",
    )
    proc = launch("adaptive-spec", *args, store=Path(tempfile.mkdtemp(prefix="qs-ad-")))
    upload(proc.base_url, "nodraft", SHIPPED / "stdlib-docs")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def plain(plain_server) -> str:
    """The session's ``--no-speculation`` server (tests/conftest.py), ``nodraft`` among its adapters."""
    return plain_server.base_url


@pytest.fixture(scope="module")
def stdlib_prompts() -> list[str]:
    return [" ".join(d.split()[:12]) for d in split_docstrings(stdlib_docstrings())[1][:8]]


def gauges(url: str, adapter: str) -> tuple[float, float]:
    """(k, acceptance estimate) of ``adapter`` from /metrics (a scrape asks the engine for its report first)."""
    s = scrape(url)
    return total(s, K_GAUGE, adapter=adapter), total(s, A_GAUGE, adapter=adapter)


def test_the_policy_drafts_less_for_an_adapter_whose_drafts_are_rejected(adaptive, stdlib_prompts, prompts):
    # nodraft on its own domain (drafted by the plain draft) and the base, one request at a time: at batch 1
    # drafting pays for the base, while nodraft's estimate falls until its requests draft nothing
    for far, near in zip(stdlib_prompts, prompts[:8], strict=True):
        complete(adaptive.base_url, "nodraft", far, 32)
        complete(adaptive.base_url, MODEL, near, 32)
    k_far, a_far = gauges(adaptive.base_url, "nodraft")
    k_base, a_base = gauges(adaptive.base_url, "(base)")
    print(f"after traffic: nodraft k {k_far:.2f} acceptance {a_far:.3f}; base k {k_base:.2f} acceptance {a_base:.3f}")
    assert 0 < a_far < a_base  # 0: no such series
    assert k_far < k_base


def test_a_mixed_batch_with_different_k_gives_the_plain_greedy_output(adaptive, plain, prompts, stdlib_prompts):
    models = [MODEL, "austen", "stdlib-docs", "nodraft"]
    cases = [(models[i % 4], (stdlib_prompts if models[i % 4] == "nodraft" else prompts)[i % 8]) for i in range(16)]
    with cf.ThreadPoolExecutor(len(cases)) as pool:  # all at once: one batch of the four kinds
        batched = list(pool.map(lambda c: complete(adaptive.base_url, *c), cases))
    refs = [complete(plain, *c) for c in cases]  # solo, no speculation
    wrong = [(c, why) for c, got, ref in zip(cases, batched, refs, strict=True) if (why := parting(got, ref))]
    assert not wrong, wrong
    assert "first step whose requests draft different k" in adaptive.log_tail(100_000)
    assert httpx.get(adaptive.base_url + "/ready", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def skipping():
    # Step-time model (cost.CostModel) where drafting pays for one request at any acceptance above 0.24 and a
    # step without the draft wins for 8 at any acceptance below 0.98, so the estimate's value cannot decide it:
    # the per-draft acceptance depends on k (a first draft is accepted more often than a fourth), so the base
    # estimate depends on how the 8 requests happened to arrive (0.48 when early steps ran alone at k=4, 0.68
    # when all 8 started together at k=1). B=1: k=1 costs 10 + 2 + 0.1 + 1.5 = 13.6 ms against 11, paying when
    # (1 + a) / 13.6 > 1 / 11; B=8: no draft 8 / 18 ms beats k=1's 16 / 38.1 ms even at a = 1 (k=4 pays at 0.98).
    proc = launch("adaptive-skip", "--speculation-policy", "adaptive", "--speculation-cost-ms", "10,1,0.1,0.5",
                  "--no-speculation-cost-online")  # fmt: skip
    yield proc
    proc.stop()


def test_steps_without_the_draft_keep_the_output_and_later_requests_draft_again(skipping, plain, prompts):
    with cf.ThreadPoolExecutor(8) as pool:  # 8 at once: the policy skips the draft model
        batched = list(pool.map(lambda p: complete(skipping.base_url, MODEL, p, 32), prompts[:8]))
    skipped = total(scrape(skipping.base_url), "qserve_speculation_steps_without_draft")
    k_before, a_before = gauges(skipping.base_url, "(base)")
    solo = complete(skipping.base_url, MODEL, prompts[8], 32)  # alone, fresh draft KV: it drafts again
    refs = [complete(plain, MODEL, p, 32) for p in prompts[:9]]
    wrong = [
        (i, why) for i, (got, ref) in enumerate(zip([*batched, solo], refs, strict=True)) if (why := parting(got, ref))
    ]
    assert not wrong, wrong
    log = skipping.log_tail(100_000)
    said = [line for line in log.splitlines() if "adaptive" in line or "speculation state" in line]
    print(f"8 at once: {skipped:.0f} steps without the draft; base k {k_before:.2f} acceptance {a_before:.3f}")
    assert "adaptive speculation failed" not in log, said
    assert skipped > 0, (a_before, k_before, said)
    assert "first step the runner ran without the draft model" in log, said  # the worker saw it
    # ... and built steps with no drafts anywhere as without speculation (plain sampler, no spec metadata)
    assert "first step the runner built as a plain decode step" in log, said
    spec = solo["metrics"]["speculative_decoding"]
    assert spec["num_draft_tokens"] > 0 and spec["num_accepted_draft_tokens"] > 0, (a_before, k_before, spec)


def test_an_admin_override_fixes_an_adapters_k_until_it_is_cleared(adaptive, plain, stdlib_prompts):
    url = adaptive.base_url + "/v1/adapters/nodraft/speculation"
    for body, status, says in [
        ({"k": 9}, 400, "k must be an integer from 0 (no drafting) to 4"),
        ({"k": -1}, 400, "got -1"),
        ({"k": "two"}, 400, "k"),
        ({"k": 1, "extra": 1}, 400, "extra"),
        ({}, 400, "k"),
    ]:
        r = httpx.put(url, json=body, timeout=30)
        assert r.status_code == status and says in r.json()["error"]["message"], (body, r.text)
    r = httpx.put(adaptive.base_url + "/v1/adapters/nosuch/speculation", json={"k": 1}, timeout=30)
    assert r.status_code == 404 and "nodraft" in r.json()["error"]["message"]  # it names the stored ones
    assert httpx.get(adaptive.base_url + "/v1/adapters/nodraft", timeout=30).json()["speculation_k_override"] is None

    r = httpx.put(url, json={"k": 0}, timeout=30)
    assert r.status_code == 200 and r.json()["speculation_k_override"] == 0, r.text
    spec = complete(adaptive.base_url, "nodraft", stdlib_prompts[0], 16)["metrics"]["speculative_decoding"]
    assert spec["num_draft_tokens"] == 0, spec
    k_held = gauges(adaptive.base_url, "nodraft")[0]  # drafts per request-step, a running mean
    # k=4 for an adapter whose drafts the policy had given up on: every step of the request drafts 4
    assert httpx.put(url, json={"k": 4}, timeout=30).json()["speculation_k_override"] == 4
    spec = complete(adaptive.base_url, "nodraft", stdlib_prompts[1], 16)["metrics"]["speculative_decoding"]
    assert spec["num_draft_tokens"] >= 4 * 3, spec  # the 15 tokens after the prefill take 3 or more steps of 4
    assert gauges(adaptive.base_url, "nodraft")[0] > k_held
    listed = {a["name"]: a for a in httpx.get(adaptive.base_url + "/v1/adapters", timeout=30).json()["data"]}
    assert listed["nodraft"]["speculation_k_override"] == 4 and listed["austen"]["speculation_k_override"] is None

    r = httpx.delete(url, timeout=30)
    assert r.status_code == 200 and r.json()["speculation_k_override"] is None
    r = httpx.put(plain + "/v1/adapters/nodraft/speculation", json={"k": 1}, timeout=30)
    assert r.status_code == 409 and "speculation is off" in r.json()["error"]["message"]


def test_a_request_drafts_nothing_that_cannot_become_output(adaptive, plain, prompts):
    # Drafting pays at batch 1 under this server's model, so what stops the drafts below is the cap alone
    # (scheduler_policy.usable_drafts): after the prefill of a 2-token request its last token comes from the
    # next step's own sampling, and of a 3-token request's at most one can come from a draft.
    for max_tokens, most in ((2, 0), (3, 1)):
        got = complete(adaptive.base_url, MODEL, prompts[0], max_tokens)
        spec = got["metrics"]["speculative_decoding"]
        assert spec["num_draft_tokens"] <= most, (max_tokens, spec)
        assert not parting(got, complete(plain, MODEL, prompts[0], max_tokens))
    spec = complete(adaptive.base_url, MODEL, prompts[0], 12)["metrics"]["speculative_decoding"]
    assert spec["num_draft_tokens"] > 1, spec  # with room to use them, the same request drafts
