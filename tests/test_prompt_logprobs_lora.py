"""Prompt logprobs (``echo`` + ``logprobs``) for the base model and adapters, several in one batch: every request
is answered with the logprobs it gets alone, and the engine lives (server/engine/vllm_patches/prompt_logprobs_lora.py).
"""

from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

from server.engine.vllm_patches.prompt_logprobs_lora import token_rows
from tests.conftest import ADAPTERS, MODEL

MODELS = (MODEL, *ADAPTERS)


def _echo(client, i: int):
    """Request ``i``: model ``MODELS[i % 3]``, a prompt of its own length; returns (tokens, token logprobs)."""
    prompt = "The sea was calm and the night " * (1 + i % 4) + f"number {i}"
    r = client.completions.create(model=MODELS[i % 3], prompt=prompt, echo=True, logprobs=1, max_tokens=1)
    lp = r.choices[0].logprobs
    return lp.tokens, lp.token_logprobs


@pytest.mark.engine
def test_echo_logprobs_of_base_and_adapters_in_one_batch_match_each_alone(client, base_url):
    import httpx

    alone = [_echo(client, i) for i in range(6)]
    with cf.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda i: _echo(client, i % 6), range(12)))
    assert httpx.get(base_url + "/ready", timeout=10).status_code == 200  # the engine lived
    for i, (tokens, logprobs) in enumerate(together):
        want_tokens, want = alone[i % 6]
        assert tokens[:-1] == want_tokens[:-1], i  # the echoed prompt (the sampled last token may differ)
        assert logprobs[0] is None and want[0] is None
        # batched and alone runs round differently in bf16; a wrong adapter moves these by nats
        assert max(abs(a - b) for a, b in zip(logprobs[1:-1], want[1:-1], strict=True)) < 0.05, (i, MODELS[i % 6 % 3])


def test_token_rows_finds_a_row_slice_and_refuses_anything_else():
    hidden = torch.randn(10, 4)
    assert token_rows(hidden, hidden[3:7]) == slice(3, 7)
    assert token_rows(hidden, hidden[:10]) == slice(0, 10)
    for not_a_slice in (hidden[3:7].clone(), hidden[:, :2], hidden[::2]):
        with pytest.raises(RuntimeError, match="not a row slice"):
            token_rows(hidden, not_a_slice)
