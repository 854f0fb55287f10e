"""Adaptive speculation (``--speculation-policy adaptive``, vllm_patches.adaptive_k) through real servers.

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

from tests.conftest import MODEL, launch
from tests.promtext import scrape, total
from tests.test_draft_lora import SHIPPED, complete, parting, upload
from training.stdlib_text import split_docstrings, stdlib_docstrings

pytestmark = pytest.mark.engine
K_GAUGE, A_GAUGE = "qserve_speculation_k", "qserve_speculation_acceptance_estimate"


@pytest.fixture(scope="module")
def adaptive():
    proc = launch("adaptive-spec", "--speculation-policy", "adaptive", store=Path(tempfile.mkdtemp(prefix="qs-ad-")))
    upload(proc.base_url, "nodraft", SHIPPED / "stdlib-docs")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def plain():
    proc = launch("adaptive-spec-plain", "--no-speculation")
    upload(proc.base_url, "nodraft", SHIPPED / "stdlib-docs")
    yield proc.base_url
    proc.stop()


@pytest.fixture(scope="module")
def stdlib_prompts() -> list[str]:
    return [" ".join(d.split()[:12]) for d in split_docstrings(stdlib_docstrings())[1][:8]]


def gauges(url: str, adapter: str) -> tuple[float, float]:
    """(k, acceptance estimate) of ``adapter`` from /metrics (a scrape asks the engine for its report first)."""
    s = scrape(url)
    return total(s, K_GAUGE, adapter=adapter), total(s, A_GAUGE, adapter=adapter)


def test_the_policy_drafts_less_for_an_adapter_whose_drafts_are_rejected(adaptive, stdlib_prompts, prompts):
    # nodraft on its own domain (drafted by the plain draft) beside the base, 8 of each at once; the base
    # requests are longer so the batch's tail, where B is small and drafting is cheap, holds only them
    cases = [("nodraft", p, 32) for p in stdlib_prompts] + [(MODEL, p, 64) for p in prompts[:8]]
    for _ in range(2):
        with cf.ThreadPoolExecutor(len(cases)) as pool:
            list(pool.map(lambda c: complete(adaptive.base_url, *c), cases))
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
