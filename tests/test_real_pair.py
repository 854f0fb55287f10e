"""The real pair end to end: SmolLM2-135M-Instruct served NF4 with its distilled draft and shipped adapters.

One server with the settings of ``python -m server`` (``--pair smollm2``) and the fixed policy named, so
every request drafts and the draft's acceptance can be read; one without speculation; and one with the
adaptive policy, the pair's default (which may draft nothing where drafting does not pay), for its
greedy answers. All three run ``--batch-invariant``, whose contract the greedy-equality tests hold
(README, "Speculation guarantees"). All are driven by the official ``openai`` client on 127.0.0.1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import openai
import pytest

from server.engine.vllm_patches import PATCHES, WRITTEN_FOR
from server.pairs import PAIRS
from testing.process import start_server
from tests.conftest import LOG_DIR

pytestmark = pytest.mark.engine
PAIR = PAIRS["smollm2"]
MODEL = PAIR.served_model_name
QUESTIONS = ("What is the capital of France?", "How do I reverse a list in Python?", "Name three primary colors.")


def _start(name: str, *args: str):
    store = Path(tempfile.mkdtemp(prefix=f"qserve-store-{name}-"))
    env = {"QSERVE_ADAPTER_STORE_DIR": str(store), "QSERVE_MERGED_MODELS_DIR": f"{store}-merged"}
    return start_server(list(args), LOG_DIR / f"{name}.log", env=env, pair="smollm2")


@pytest.fixture(scope="module")
def real():
    proc = _start("real-pair", "--speculation-policy", "fixed", "--batch-invariant")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def plain():
    proc = _start("real-pair-nospec", "--no-speculation", "--batch-invariant")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(real):
    return openai.OpenAI(base_url=real.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _shipped_adapters() -> list[str]:
    return sorted(p.name for p in PAIR.seed_adapters.iterdir() if (p / "adapter_config.json").is_file())


def _chat(client, question: str, model: str = MODEL, max_tokens: int = 48) -> str:
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
    )
    return r.choices[0].message.content


def test_ready_reports_nf4_with_the_distilled_draft(real):
    ready = httpx.get(real.base_url + "/ready", timeout=10).json()
    assert ready["quantization"] == "bitsandbytes"
    assert ready["speculative"]["method"] == "draft_model"
    assert Path(ready["speculative"]["draft_model"]) == PAIR.draft
    assert ready["speculative"]["draft_quantization"] is None  # bf16 beside the NF4 target (hooks/draft_loader.py)
    assert ready["vllm_patches"] == {"vllm_version": WRITTEN_FOR, "applied": sorted(PATCHES)}


def test_models_lists_the_real_model_and_its_shipped_adapters(client):
    ids = {m.id for m in client.models.list().data}
    assert MODEL in ids
    assert set(_shipped_adapters()) <= ids


def test_chat_answers_are_on_topic(client):
    assert "Paris" in _chat(client, QUESTIONS[0])
    assert "reverse" in _chat(client, QUESTIONS[1]).lower()


def test_chat_and_completion_streams_equal_their_unstreamed_answers(client):
    messages = [{"role": "user", "content": QUESTIONS[2]}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=32, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == full.choices[0].message.content
    prompt = "The three laws of motion are"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=32, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text


def test_the_draft_is_used_and_accepted(real):
    drafted = accepted = 0
    for question in QUESTIONS:  # chat: the distribution the draft was distilled on
        r = httpx.post(
            real.base_url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 48,
                  "temperature": 0},
            timeout=300,
        ).json()  # fmt: skip
        spec = r["metrics"]["speculative_decoding"]
        drafted += spec["num_draft_tokens"]
        accepted += spec["num_accepted_draft_tokens"]
    assert drafted > 0 and accepted > 0, (drafted, accepted)


def test_each_shipped_adapter_changes_the_answer(client):
    names = _shipped_adapters()
    assert len(names) >= 2, "the real pair ships at least two adapters"
    base = _chat(client, "Describe a rainy afternoon.", max_tokens=32)
    for name in names:
        assert _chat(client, "Describe a rainy afternoon.", model=name, max_tokens=32) != base


def _chat_tokens(client, question: str, model: str = MODEL, max_tokens: int = 48) -> list:
    """The greedy answer's tokens, each with its logprob and its 5 most likely alternatives."""
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
        logprobs=True, top_logprobs=5,
    )  # fmt: skip
    return r.choices[0].logprobs.content


EXACT_NATS = 0.02  # README "Speculation guarantees": greedy logprobs on the same prefix agree to this


def _logprob_gap(got: list, ref: list) -> float:
    """The largest difference (nats) of the same token's logprob, chosen or among the top 5, over two greedy
    answers; ``inf`` if their tokens differ."""
    if [t.token for t in got] != [t.token for t in ref]:
        return float("inf")
    gap = 0.0
    for a, b in zip(got, ref, strict=True):
        tops = {t.token: t.logprob for t in b.top_logprobs}
        gap = max(
            [gap, abs(a.logprob - b.logprob)]
            + [abs(t.logprob - tops[t.token]) for t in a.top_logprobs if t.token in tops]
        )
    return gap


def _same_greedy_tokens(spec_client, plain) -> None:
    """Assert ``spec_client``'s greedy chat answers (base and one shipped adapter) are those of ``plain``: the same
    tokens, every logprob within ``EXACT_NATS``."""
    cases = [(MODEL, q) for q in QUESTIONS] + [(n, QUESTIONS[0]) for n in _shipped_adapters()[:1]]
    c = openai.OpenAI(base_url=plain.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    for model, question in cases:
        got, ref = _chat_tokens(spec_client, question, model=model), _chat_tokens(c, question, model=model)
        assert _logprob_gap(got, ref) <= EXACT_NATS, (
            model,
            question,
            "".join(t.token for t in got),
            "".join(t.token for t in ref),
        )


def test_a_request_batched_with_adapter_requests_equals_it_alone(plain):
    """No speculation: a base request and an adapter request, each alone and then in one batch with three
    other requests (base and both shipped adapters), give the same greedy logprobs. Without the
    ``row_invariant_gemm`` patch the base answer's logprobs moved 0.1-0.25 nats here (one-row matmuls)."""
    from concurrent.futures import ThreadPoolExecutor

    c = openai.OpenAI(base_url=plain.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    adapters = _shipped_adapters()
    mix = [(MODEL, QUESTIONS[0]), (adapters[0], QUESTIONS[1]), (MODEL, QUESTIONS[2]), (adapters[1], QUESTIONS[0])]
    alone = [_chat_tokens(c, q, model=m) for m, q in mix[:2]]
    with ThreadPoolExecutor(len(mix) + 1) as pool:
        batched = list(pool.map(lambda mq: _chat_tokens(c, mq[1], model=mq[0]), [*mix, mix[0]]))
    for (model, question), solo, together in zip(mix[:2], alone, batched[:2], strict=True):
        assert _logprob_gap(together, solo) <= EXACT_NATS, (model, question)
    assert _logprob_gap(batched[-1], alone[0]) <= EXACT_NATS


def test_speculation_changes_no_greedy_token(client, plain):
    _same_greedy_tokens(client, plain)


def test_the_default_policy_is_adaptive_drafts_at_most_4_refits_online_and_changes_no_greedy_token(plain):
    adaptive = _start("real-pair-adaptive", "--batch-invariant")
    try:
        ready = httpx.get(adaptive.base_url + "/ready", timeout=10).json()
        spec = ready["speculative"]
        assert (spec["policy"], spec["num_speculative_tokens"], spec["cost_online"]) == ("adaptive", 4, True), ready
        c = openai.OpenAI(base_url=adaptive.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
        _same_greedy_tokens(c, plain)
    finally:
        adaptive.stop()


def _acceptance(real, model: str, questions: list[str]) -> float:
    """Accepted / draft tokens over greedy chat answers of ``model`` to ``questions`` (48 tokens each)."""
    drafted = accepted = 0
    for question in questions:
        r = httpx.post(
            real.base_url + "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 48,
                  "temperature": 0, "ignore_eos": True},
            timeout=300,
        ).json()  # fmt: skip
        spec = r["metrics"]["speculative_decoding"]
        drafted += spec["num_draft_tokens"]
        accepted += spec["num_accepted_draft_tokens"]
    assert drafted > 0, model
    return accepted / drafted


def test_the_shipped_draft_adapter_raises_acceptance_on_its_domain(real):
    """stdlib-docs drafted with its distilled draft adapter vs the same target adapter drafted by the plain
    draft, on held-out Python prompts (teacher-forced greedy agreement 0.21 -> 0.39, the adapter's card)."""
    import prompts

    folder = PAIR.seed_adapters / "stdlib-docs"
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    r = httpx.post(real.base_url + "/v1/adapters", data={"name": "stdlib-plain-draft"}, files=files, timeout=120)
    assert r.status_code == 201, r.text
    questions = prompts.domain_prompts("python-docs", 6)
    with_draft_adapter = _acceptance(real, "stdlib-docs", questions)
    plain_draft = _acceptance(real, "stdlib-plain-draft", questions)
    assert with_draft_adapter > 1.3 * plain_draft, (with_draft_adapter, plain_draft)


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PAIR.target)


CJK_PROMPT = "Chinese words and their meaning: 猫 cat, 狗 dog, 鸟 bird, 鱼 fish, 马 horse, 牛 cow, 羊"


def test_an_output_that_stops_inside_a_character_ends_with_its_bytes(plain):
    """Cut a greedy CJK completion where its tokens end inside a character: the text, streamed and not, is what
    the tokens decode to (U+FFFD for the incomplete character), never one character short."""
    c = openai.OpenAI(base_url=plain.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    ids = (
        c.completions.create(
            model=MODEL, prompt=CJK_PROMPT, max_tokens=24, temperature=0, extra_body={"return_token_ids": True}
        )
        .choices[0]
        .token_ids
    )
    tok = _tokenizer()
    cuts = [k for k in range(1, len(ids) + 1) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert cuts, f"no token of {tok.decode(ids)!r} ends inside a character"
    k = cuts[0]
    full = c.completions.create(model=MODEL, prompt=CJK_PROMPT, max_tokens=k, temperature=0)
    stream = c.completions.create(model=MODEL, prompt=CJK_PROMPT, max_tokens=k, temperature=0, stream=True)
    assert full.choices[0].finish_reason == "length"
    assert full.choices[0].text == tok.decode(ids[:k])
    assert "".join(x.choices[0].text for x in stream if x.choices) == tok.decode(ids[:k])


def test_chat_logprobs_spell_the_content_and_usage_counts_them(plain):
    """An answer that ends on <|im_end|>: its logprob entries' bytes are the content, without the end token, and
    ``completion_tokens`` counts exactly those entries, streamed and not."""
    c = openai.OpenAI(base_url=plain.base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
    ask = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 1 + 1?"}],
        max_tokens=160,
        temperature=0,
        logprobs=True,
    )
    r = c.chat.completions.create(**ask)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice
    entries = choice.logprobs.content
    assert bytes(b for e in entries for b in e.bytes).decode() == choice.message.content
    assert r.usage.completion_tokens == len(entries)
    chunks = list(c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    streamed = [e for x in chunks if x.choices and x.choices[0].logprobs for e in x.choices[0].logprobs.content]
    assert "".join(x.choices[0].delta.content or "" for x in chunks if x.choices) == choice.message.content
    assert bytes(b for e in streamed for b in e.bytes).decode() == choice.message.content
    assert chunks[-1].usage.completion_tokens == len(streamed)


def test_a_draft_adapter_uploaded_as_an_adapter_of_the_target_is_refused(real):
    """The shipped austen draft adapter (4 layers, the draft's width) fits every shape of the 30-layer target;
    it is refused with a 400 naming the mismatch, stores nothing, and is served when the override is sent."""
    folder = PAIR.seed_adapters / "austen" / "draft"
    files = [("files", (f, (folder / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
    r = httpx.post(real.base_url + "/v1/adapters", data={"name": "austen-as-target"}, files=files, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request_error", "files")
    assert "adapts layers 0-3 only" in err["message"] and "30 layers of the base model" in err["message"], err
    assert "models/smollm2-135m-draft" in err["message"] and "allow_base_mismatch" in err["message"]
    assert httpx.get(real.base_url + "/v1/adapters/austen-as-target", timeout=10).status_code == 404
    data = {"name": "austen-as-target", "allow_base_mismatch": "true"}
    r = httpx.post(real.base_url + "/v1/adapters", data=data, files=files, timeout=120)
    assert r.status_code == 201, r.text
