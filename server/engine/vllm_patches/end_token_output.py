"""An output that ends on the end (or a stop) token returns neither that token nor its logprob.

Fault (vLLM 0.32.0): a request that stops because it sampled the end-of-sequence token or one
of its ``stop_token_ids`` keeps that token in ``CompletionOutput.token_ids`` and its entry in
``logprobs``, though its text is left out of the output (``include_stop_str_in_output`` false,
the default). A chat answer ``1 + 1 = 2`` then carries logprob entries spelling
``1 + 1 = 2<|im_end|>``, and ``usage.completion_tokens`` counts a token the client never sees.
OpenAI's logprob entries spell exactly the returned content.

Fix: where the engine's output processor builds a finished ``CompletionOutput`` whose finish
was such a token, the token and its logprob entry are left out of what is returned (full and
delta outputs alike); the serving layer then builds logprobs and counts
``completion_tokens`` from the same list, so both agree that the end token is not output.
The engine's own counters (``vllm:generation_tokens``) still count every token it sampled.
"""

from __future__ import annotations

import functools


def drop_end_token(output, ends_on_stop_token: bool):
    """``output`` (a ``CompletionOutput``) without its last token and logprob entry when ``ends_on_stop_token``.

    Returns ``output`` itself, changed only by rebinding its ``token_ids`` and ``logprobs`` to
    shorter copies (the detokenizer's and logprobs processor's own lists are never touched).
    """
    if not ends_on_stop_token or not len(output.token_ids):
        return output
    output.token_ids = list(output.token_ids)[:-1]
    if output.logprobs is not None and len(output.logprobs):
        output.logprobs = output.logprobs[:-1]
    return output


def patch() -> None:
    """Wrap ``RequestState._new_completion_output`` in vLLM's output processor (idempotent)."""
    from vllm.v1.engine import FinishReason
    from vllm.v1.engine.output_processor import RequestState

    original = RequestState._new_completion_output
    if getattr(original, "_qserve_patched", False):
        return

    @functools.wraps(original)
    def _new_completion_output(self, token_ids, finish_reason, stop_reason):
        output = original(self, token_ids, finish_reason, stop_reason)
        ends_on_stop_token = (
            finish_reason == FinishReason.STOP
            and not isinstance(stop_reason, str)  # a stop string ends the text inside a token, which stays
            and not self.detokenizer.include_stop_str_in_output
        )
        return drop_end_token(output, ends_on_stop_token)

    _new_completion_output._qserve_patched = True
    RequestState._new_completion_output = _new_completion_output
