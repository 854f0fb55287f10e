"""Chat ``top_logprobs`` are the N most likely tokens, most likely first.

Fault (vLLM 0.32.0): the engine returns, per generated position, a dict of the
sampled token first and then the ``top_logprobs`` most likely tokens (N + 1 entries
when the sampled token is not among them). ``OpenAIServingChat._get_top_logprobs``
(``vllm/entrypoints/openai/chat_completion/serving.py``) keeps the first N entries in
dict order, so with sampling the sampled token can take entry 0 though it is not
among the N most likely, displacing a real one and leaving the list unsorted.
OpenAI's Chat API defines ``top_logprobs`` as the N most likely tokens.

Fix: order the entries by vocabulary rank (``Logprob.rank``, 1 = most likely) before
keeping N. The sampled token's own logprob stays in the content entry's ``logprob``.
Requests for specific token ids (``logprob_token_ids``, ``return_all``) keep vLLM's
order. The Completions API is untouched: OpenAI's legacy ``logprobs`` includes the
sampled token (up to N + 1 entries). Reproduction: docs/upstream/vllm_chat_top_logprobs.md.
"""

from __future__ import annotations

import functools


def _by_rank(logprobs: dict) -> dict:
    """``logprobs`` ({token id: Logprob}) ordered by rank, entries without a rank last."""
    return dict(sorted(logprobs.items(), key=lambda kv: (kv[1].rank is None, kv[1].rank or 0)))


def patch() -> None:
    """Wrap ``OpenAIServingChat._get_top_logprobs`` to rank-order its input (idempotent)."""
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    original = OpenAIServingChat._get_top_logprobs
    if getattr(original, "_qserve_patched", False):
        return

    @functools.wraps(original)
    def _get_top_logprobs(self, logprobs, top_logprobs, tokenizer, should_return_as_token_id, return_all=False):
        ranked = logprobs if return_all else _by_rank(logprobs)
        return original(self, ranked, top_logprobs, tokenizer, should_return_as_token_id, return_all)

    _get_top_logprobs._qserve_patched = True
    OpenAIServingChat._get_top_logprobs = _get_top_logprobs
