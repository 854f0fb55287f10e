"""The near-tie rule of the greedy-equality tests: two greedy runs that should give the same tokens may
part only where the reference's top tokens are within rounding of each other.

Why: another batch shape (speculation verifies several tokens per step, a mixed batch, another kernel)
rounds the logits differently, and bf16 rounding of logits of magnitude ~10 is ~0.04 nats, so a near-tie
may break either way. Anything else is a real difference (a wrong adapter, a broken kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

NEAR_TIE = 0.05  # nats: bf16 rounding of logits of magnitude ~10 is ~0.04
MAX_ROUNDING_GAP = 0.2  # nats: the most a near-tie may be, whatever the rounding noise a run shows


@dataclass(frozen=True)
class Token:
    """One generated token: ``key`` (what equality compares: the id, or the text where the API gives no
    id), ``text``, its ``logprob`` (nats) and ``top``, the most likely tokens there (text -> logprob)."""

    key: object
    text: str
    logprob: float
    top: dict[str, float]


def completion_tokens(response: dict) -> list[Token]:
    """The tokens of a ``/v1/completions`` response (JSON) asked with ``return_token_ids`` and ``logprobs``."""
    c = response["choices"][0]
    lp = c["logprobs"]
    return [Token(*t) for t in zip(c["token_ids"], lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)]


def chat_tokens(content: list) -> list[Token]:
    """The tokens of a chat answer's ``logprobs.content`` (the ``openai`` client's objects, ``top_logprobs`` asked)."""
    return [Token(t.token, t.token, t.logprob, {x.token: x.logprob for x in t.top_logprobs}) for t in content]


def parting(got: list[Token], ref: list[Token], scale_with_noise: bool = False) -> str | None:
    """None if ``got`` has ``ref``'s tokens, or parts from them only at a near-tie of ``ref``; else why not.

    A near-tie: the reference's top logprob exceeds that of ``got``'s token by under ``NEAR_TIE`` nats.
    ``scale_with_noise``: or by under twice the rounding noise the two runs show where they agree (the
    largest difference of the same token's logprob before the parting), for models whose larger logits
    round more (the real pair); never above ``MAX_ROUNDING_GAP``, so a run whose logprobs differ by more
    than rounding cannot excuse its own parting.
    """
    first = next((i for i, (x, y) in enumerate(zip(got, ref)) if x.key != y.key), None)  # noqa: B905
    text = "".join(t.text for t in got)
    if first is None:
        return None if len(got) == len(ref) else f"lengths differ: {len(got)} vs {len(ref)} tokens: {text!r}"
    top = ref[first].top
    gap = max(top.values()) - top.get(got[first].text, float("-inf"))
    noise = max((abs(x.logprob - y.logprob) for x, y in zip(got[:first], ref[:first], strict=True)), default=0.0)
    allowed = max(NEAR_TIE, min(2 * noise, MAX_ROUNDING_GAP)) if scale_with_noise else NEAR_TIE
    if gap < allowed:
        return None
    return f"parts at token {first} ({got[first].text!r}) by {gap:.3f} nats (rounding noise {noise:.3f}): {text!r}"
