"""The usual suspects for OpenAI-compatible servers, against the default server with the official client.

Stop strings across token boundaries (never leaked into a stream), multi-byte UTF-8 split over
tokens and stream chunks, max_tokens 0/1/huge, n>1 with seeds, logprobs shapes, an empty
prompt, prompts as token ids, and batch prompts.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import MODEL

pytestmark = pytest.mark.engine

PROMPT = "Call me Ishmael. Some years ago, never mind how long precisely,"


def _stream_text(client, **kwargs) -> tuple[list[str], str | None]:
    chunks, finish = [], None
    for chunk in client.completions.create(model=MODEL, stream=True, **kwargs):
        for choice in chunk.choices:
            chunks.append(choice.text)
            finish = choice.finish_reason or finish
    return chunks, finish


def test_stop_string_across_a_token_boundary_never_leaks_into_the_stream(client):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, logprobs=0)
    text, tokens = full.choices[0].text, full.choices[0].logprobs.tokens
    # A stop string made of the end of one token and the start of the next, first seen at that boundary.
    offset, stop = 0, None
    for left, right in zip(tokens, tokens[1:], strict=False):
        offset += len(left)
        candidate = left[-2:] + right[:2]
        if len(left) >= 2 and len(right) >= 2 and text.find(candidate) == offset - 2 and offset > 4:
            stop = candidate
            break
    assert stop is not None, tokens
    chunks, finish = _stream_text(client, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert finish == "stop"
    assert "".join(chunks) == text[: text.find(stop)]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.find(stop)]


def test_multibyte_utf8_split_over_tokens_streams_whole_characters(client):
    # vLLM's structured outputs force a text whose characters are 2-4 byte-level tokens each.
    text = "日本語 café 🙂 " * 3 + "終"  # long enough for many engine steps, so several stream chunks
    body = {
        "prompt": "Say:",
        "max_tokens": 120,
        "temperature": 0,
        "extra_body": {"structured_outputs": {"choice": [text]}},
    }
    full = client.completions.create(model=MODEL, **body)
    assert full.choices[0].text == text
    assert full.usage.completion_tokens > len(text)  # the characters really were split over tokens
    chunks, _ = _stream_text(client, **body)
    assert "".join(chunks) == text
    assert len([c for c in chunks if c]) > 1
    assert not any("\ufffd" in c for c in chunks)  # no chunk carries half a character


def test_max_tokens_zero_one_and_huge(client):
    one = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1 and one.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10**9)
    assert info.value.response.json()["error"]["param"] == "max_tokens"
    zero = httpx.post(
        str(client.base_url) + "completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 0}, timeout=60
    )
    if zero.status_code == 200:
        assert zero.json()["usage"]["completion_tokens"] == 0
    else:
        assert zero.status_code == 400 and zero.json()["error"]["param"] == "max_tokens", zero.text


def test_n_with_a_seed_is_reproducible_and_the_choices_differ(client):
    """Failed before server/engine/vllm_patches/seeded_drafts.py (docs/upstream/vllm_probabilistic_draft_seed.md)."""
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 11}
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert len(set(texts)) >= 2, texts
    assert a.usage.completion_tokens == 36


def test_logprobs_shapes_completions_and_chat(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(3 <= len(top) <= 4 for top in lp.top_logprobs)  # top 3, plus the chosen token if not among them
    assert lp.text_offset == sorted(lp.text_offset)
    echo = client.completions.create(model=MODEL, prompt="The sea", max_tokens=2, temperature=0, logprobs=1, echo=True)
    elp = echo.choices[0].logprobs
    assert elp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert len(elp.tokens) == echo.usage.prompt_tokens + 2
    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 5 and t.logprob <= 0 for t in content)


def test_empty_prompt(client):
    r = httpx.post(
        str(client.base_url) + "completions", json={"model": MODEL, "prompt": "", "max_tokens": 3}, timeout=60
    )
    if r.status_code == 200:  # the tokenizer's BOS token alone is a prompt
        assert r.json()["usage"]["prompt_tokens"] >= 1 and r.json()["usage"]["completion_tokens"] >= 1
    else:
        err = r.json()["error"]
        assert r.status_code == 400 and err["code"] == 400 and "prompt" in err["message"].lower(), err


def test_prompt_as_token_ids_equals_the_text_prompt(client):
    text = client.completions.create(model=MODEL, prompt=" the end", max_tokens=8, temperature=0)
    ids = client.completions.create(model=MODEL, prompt=[1, 265, 919], max_tokens=8, temperature=0)
    assert ids.choices[0].text == text.choices[0].text
    assert ids.usage.prompt_tokens == text.usage.prompt_tokens == 3


def test_batch_prompts_each_match_their_single_request(client):
    prompts = ["The sea was", "Holmes said", "It was a dark"]
    singles = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text for p in prompts
    ]
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == singles
    assert batch.usage.completion_tokens == 18
    token_batch = client.completions.create(model=MODEL, prompt=[[1, 265, 919], [1, 265]], max_tokens=2, temperature=0)
    assert sorted(c.index for c in token_batch.choices) == [0, 1]
