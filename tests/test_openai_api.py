"""The OpenAI API through the official ``openai`` client against a real server process."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from bench.serving_bench import spec_counters
from tests.conftest import ADAPTERS, MODEL

pytestmark = pytest.mark.engine


def _join_stream(stream) -> tuple[str, object]:
    text, usage = [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if hasattr(choice, "delta"):
                text.append(choice.delta.content or "")
            else:
                text.append(choice.text)
    return "".join(text), usage


def test_completion_stream_equals_non_stream(client, prompts):
    for prompt in prompts[:4]:
        full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert full.choices[0].finish_reason in ("length", "stop")
        assert full.usage.completion_tokens >= 1
        streamed, usage = _join_stream(
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert streamed == full.choices[0].text
        assert usage.completion_tokens == full.usage.completion_tokens
        assert usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stream_equals_non_stream(client):
    messages = [{"role": "user", "content": "Tell me of the sea and the ships upon it."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].message.content
    streamed, usage = _join_stream(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert streamed == full.choices[0].message.content
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_stream_ends_with_done_and_usage_chunk(base_url):
    body = {
        "model": MODEL,
        "prompt": "The old man",
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", base_url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    import json

    usage_chunk = json.loads(events[-2].removeprefix("data: "))
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 5


def test_max_tokens_n_and_logprobs(client):
    r = client.completions.create(
        model=MODEL, prompt="It was a dark", max_tokens=6, temperature=0.8, n=3, seed=7, logprobs=2
    )
    assert len(r.choices) == 3
    assert {c.index for c in r.choices} == {0, 1, 2}
    for c in r.choices:
        assert c.finish_reason == "length"
        assert len(c.logprobs.tokens) == 6
        assert all(1 <= len(top) <= 3 for top in c.logprobs.top_logprobs)  # chosen token + top 2
        assert all(lp <= 0.0 for lp in c.logprobs.token_logprobs)
    assert r.usage.completion_tokens == 18

    chat = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)


def test_greedy_top_p_and_temperature_zero_agree(client):
    a = client.completions.create(model=MODEL, prompt="Holmes said", max_tokens=12, temperature=0)
    b = client.completions.create(model=MODEL, prompt="Holmes said", max_tokens=12, temperature=0, top_p=0.5)
    assert a.choices[0].text == b.choices[0].text


def test_stop_string_cuts_output(client):
    prompt = "Call me Ishmael. Some years ago"
    full = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 4, full
    stop = words[len(words) // 2]
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    choice = cut.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.text
    assert full.startswith(choice.text)
    assert full[len(choice.text) :].startswith(stop)


def test_models_lists_base(client):
    ids = [m.id for m in client.models.list().data]
    assert MODEL in ids


def test_health_ready_and_nf4_really_in_use(base_url):
    assert httpx.get(base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(base_url + "/ready").json()
    assert ready["quantization"] == "bitsandbytes"  # read back from the running engine
    assert ready["speculative"]["method"] == "draft_model"
    assert ready["speculative"]["num_speculative_tokens"] == 4
    assert (ready["speculative"]["policy"], ready["speculative"]["cost_online"]) == ("fixed", False)  # demo's default
    assert ready["speculative"]["draft_model"].endswith("models/draft")
    assert ready["lora"] is True


def _spec_counters(base_url: str) -> tuple[float, float, float]:
    c = spec_counters(base_url)
    return c["num_drafts"], c["num_draft_tokens"], c["num_accepted_tokens"]


def test_spec_decode_counters_grow_by_per_request_metrics(base_url, prompts):
    before = _spec_counters(base_url)
    drafts = draft_tokens = accepted = 0
    for prompt in prompts[:5]:
        r = httpx.post(
            base_url + "/v1/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0},
            timeout=60,
        ).json()
        spec = r["metrics"]["speculative_decoding"]
        drafts += spec["num_spec_steps"]
        draft_tokens += spec["num_draft_tokens"]
        accepted += spec["num_accepted_draft_tokens"]
    assert draft_tokens > 0
    expected = (before[0] + drafts, before[1] + draft_tokens, before[2] + accepted)
    deadline = time.monotonic() + 10  # the engine's stat logger records after the response
    while _spec_counters(base_url) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _spec_counters(base_url) == expected


def test_metrics_has_engine_and_server_metrics(base_url):
    text = httpx.get(base_url + "/metrics").text
    assert "vllm:num_requests_running" in text
    assert 'qserve_http_requests_total{route="/v1/completions",status="200"}' in text
    assert "qserve_model_info{" in text


# --- bad input: the OpenAI envelope with the right status and the parameter named ---


def _envelope(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    assert body["error"]["code"] == exc.status_code
    return body["error"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    err = _envelope(info.value)
    assert "no-such-model" in err["message"] and MODEL in err["message"]
    assert err["param"] == "model"
    assert all(name in err["message"] for name in ADAPTERS), err  # adapters are served ids too
    with pytest.raises(openai.NotFoundError) as info:  # same for chat
        client.chat.completions.create(model="austen2", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert "austen2" in _envelope(info.value)["message"] and "austen" in _envelope(info.value)["message"]


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("max_tokens", -1, "max_tokens"),
        ("max_tokens", 5000, "max_tokens"),
        ("temperature", "hot", "temperature"),
        ("n", "many", "n"),
        ("top_p", 1.5, "top_p"),
        ("logprobs", 999, "logprobs"),
    ],
)
def test_invalid_parameter_is_400_naming_it(base_url, field, value, param):
    r = httpx.post(base_url + "/v1/completions", json={"model": MODEL, "prompt": "x", field: value}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_prompt_longer_than_context_is_400_with_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * 1500, max_tokens=4)
    err = _envelope(info.value)
    assert "1024" in err["message"]  # the context length
    assert "1025" in err["message"] or "1500" in err["message"]  # the prompt's length


def test_non_json_body_is_400(base_url):
    r = httpx.post(base_url + "/v1/completions", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 400
    assert "application/json" in r.json()["error"]["message"]


def test_server_still_answers_after_bad_inputs(client):
    r = client.completions.create(model=MODEL, prompt="After all that", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


def test_empty_prompt_list_and_broken_json_are_400(base_url):
    r = httpx.post(base_url + "/v1/completions", json={"model": MODEL, "prompt": [], "max_tokens": 2})
    assert r.status_code == 400 and "at least one prompt" in r.json()["error"]["message"]
    r = httpx.post(
        base_url + "/v1/completions", content=b'{"model": "x", "prompt":', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("Request body is not valid JSON")
    assert r.json()["error"]["param"] is None
