"""Paired draft adapters applied per request (server/speculation/hooks/draft_lora.py), through real servers.

Three servers on the demo pair: speculation with the patch, ``--no-speculation`` (the reference output, the
session's shared one), and speculation without the ``draft_lora`` patch (the draft unadapted, as vLLM 0.32
runs it). The shipped adapters ``austen`` and ``stdlib-docs`` both have ``draft/`` adapters; ``nodraft`` is
stdlib-docs's adapter uploaded alone.

Greedy output is compared as tests/test_adapter_oracle.py does: the same tokens, or tokens that part
only where the reference itself has a near-tie (bf16 logits within ``NEAR_TIE`` nats, e.g. two tokens at
exactly -4.4440 seen here): the target verifies a different number of tokens per step with and without
speculation, and bf16 rounding then breaks an exact tie either way.
"""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from server.engine.vllm_patches import PATCHES
from testing.process import start_server
from tests import near_tie
from tests.conftest import LOG_DIR, MODEL, SHIPPED, launch, upload
from tests.near_tie import completion_tokens
from tests.promtext import scrape, total
from training.stdlib_text import split_docstrings, stdlib_docstrings

pytestmark = pytest.mark.engine
DRAFT_METRIC = "qserve_draft_adapter_requests_total"


def complete(url: str, model: str, prompt: str, max_tokens: int = 24) -> dict:
    # logprobs 5: a bf16 tie can hold more than 2 tokens (seen: a third token at the top beside two listed)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True,
            "logprobs": 5}  # fmt: skip
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def parting(got: dict, ref: dict) -> str | None:
    """tests/near_tie.py's rule on two ``/v1/completions`` responses (``complete``'s)."""
    return near_tie.parting(completion_tokens(got), completion_tokens(ref))


def acceptance(url: str, model: str, prompts: list[str]) -> tuple[int, int]:
    """(draft tokens, accepted draft tokens) of greedy 32-token requests, one after another."""
    drafted = accepted = 0
    for p in prompts:
        sd = complete(url, model, p, 32)["metrics"]["speculative_decoding"]
        drafted, accepted = drafted + sd["num_draft_tokens"], accepted + sd["num_accepted_draft_tokens"]
    return drafted, accepted


def draft_counts(url: str, adapter: str, deadline_s: float = 10.0, want: float = 0) -> dict[str, float]:
    """``qserve_draft_adapter_requests_total`` of ``adapter`` by ``applied``, once their sum reaches ``want``."""
    end = time.monotonic() + deadline_s
    while True:
        s = scrape(url)
        got = {a: total(s, DRAFT_METRIC, adapter=adapter, applied=a) for a in ("true", "false")}
        if sum(got.values()) >= want or time.monotonic() > end:
            return got
        time.sleep(0.2)


@pytest.fixture(scope="module")
def store():
    return Path(tempfile.mkdtemp(prefix="qserve-store-draft-lora-"))


@pytest.fixture(scope="module")
def spec(store):
    proc = launch("draft-lora", store=store)
    upload(proc.base_url, "nodraft", SHIPPED / "stdlib-docs")
    yield proc.base_url
    proc.stop()


@pytest.fixture(scope="module")
def plain(plain_server) -> str:
    """The session's ``--no-speculation`` server (tests/conftest.py), ``nodraft``, ``broken`` and ``gone``
    among its adapters (each the shipped adapter alone)."""
    return plain_server.base_url


@pytest.fixture(scope="module")
def unpatched():
    store = tempfile.mkdtemp(prefix="qserve-store-draft-lora-off-")
    env = {
        "QSERVE_ADAPTER_STORE_DIR": store,
        "QSERVE_MERGED_MODELS_DIR": f"{store}-merged",
        "QSERVE_VLLM_PATCHES": ",".join(p for p in PATCHES if p != "draft_lora"),
    }
    proc = start_server([], LOG_DIR / "draft-lora-unpatched.log", env=env)
    yield proc.base_url
    proc.stop()


@pytest.fixture(scope="module")
def stdlib_prompts() -> list[str]:
    """The first 12 words of 8 held-out standard-library docstrings: stdlib-docs's own domain."""
    return [" ".join(d.split()[:12]) for d in split_docstrings(stdlib_docstrings())[1][:8]]


def test_a_mixed_batch_with_draft_adapters_gives_the_plain_greedy_output(spec, plain, prompts):
    models = [MODEL, "austen", "stdlib-docs", "nodraft"]  # base, two with draft adapters, one without
    cases = [(models[i % len(models)], prompts[i]) for i in range(16)]
    with cf.ThreadPoolExecutor(len(cases)) as pool:  # all at once: one batch of the four kinds
        batched = list(pool.map(lambda c: complete(spec, *c), cases))
    refs = [complete(plain, *c) for c in cases]  # solo, no speculation
    wrong = [(c, why) for c, got, ref in zip(cases, batched, refs, strict=True) if (why := parting(got, ref))]
    assert not wrong, wrong
    assert draft_counts(spec, "stdlib-docs", want=4)["true"] >= 4
    assert draft_counts(spec, "nodraft", want=4) == {"true": 0, "false": 4}


def test_the_draft_adapter_raises_acceptance_on_its_own_domain(spec, unpatched, stdlib_prompts, prompts):
    on_drafted, on_accepted = acceptance(spec, "stdlib-docs", stdlib_prompts)
    off_drafted, off_accepted = acceptance(unpatched, "stdlib-docs", stdlib_prompts)
    on, off = on_accepted / on_drafted, off_accepted / off_drafted
    print(f"stdlib-docs acceptance, 8 stdlib prompts x 32 tokens: patch {on:.3f} ({on_accepted}/{on_drafted}), "
          f"without draft_lora {off:.3f} ({off_accepted}/{off_drafted})")  # fmt: skip
    assert on > 2 * off and on - off > 0.08, (on, off)
    base_on, base_off = acceptance(spec, MODEL, prompts[:4]), acceptance(unpatched, MODEL, prompts[:4])
    print(f"base acceptance, 4 prompts: patch {base_on}, without {base_off}")
    assert base_on == base_off  # the base's drafts are not touched by the draft manager
    assert sum(draft_counts(unpatched, "stdlib-docs").values()) == 0  # no patch in the engine: nothing claimed


def test_a_draft_adapter_that_cannot_load_falls_back_to_the_plain_draft(spec, plain, store, prompts):
    upload(spec, "broken", SHIPPED / "stdlib-docs", draft=SHIPPED / "stdlib-docs/draft")
    upload(spec, "gone", SHIPPED / "austen", draft=SHIPPED / "austen/draft")
    # Found late, after validation: the draft file replaced by one of the target's shapes; a version
    # folder deleted under the server (the target adapter stays loaded in the engine).
    (broken,) = (store / "broken").glob("v1-*")
    shutil.copy(SHIPPED / "stdlib-docs/adapter_model.safetensors", broken / "draft/adapter_model.safetensors")
    (gone,) = (store / "gone").glob("v1-*")
    shutil.rmtree(gone)
    cases = [(m, p) for p in prompts[:3] for m in ("broken", "gone", "stdlib-docs", MODEL)]
    with cf.ThreadPoolExecutor(len(cases)) as pool:
        batched = list(pool.map(lambda c: complete(spec, *c), cases))
    refs = [complete(plain, *c) for c in cases]
    wrong = [(c, why) for c, got, ref in zip(cases, batched, refs, strict=True) if (why := parting(got, ref))]
    assert not wrong, wrong
    assert httpx.get(spec + "/ready", timeout=10).status_code == 200
    assert complete(spec, "stdlib-docs", prompts[5])["choices"][0]["token_ids"]  # the engine still serves
    assert draft_counts(spec, "broken", want=3) == {"true": 0, "false": 3}
    assert draft_counts(spec, "gone", want=3) == {"true": 0, "false": 3}
