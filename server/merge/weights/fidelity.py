"""How closely one model's next-token distributions follow a reference's, position by position.

Inputs are logits ``[T, V]`` of the same T positions (the same token prefixes,
teacher-forced) from a reference ``p`` (the adapter served unmerged on the NF4
base) and a candidate ``q`` (a merged model, or a draft). All in nats.
"""

from __future__ import annotations

import torch


def greedy_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of the T positions where argmax q == argmax p; logits ``[T, V]``.

    Raises:
        ValueError: if the shapes differ.
    """
    _same_shape(ref_logits, logits)
    return float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean())


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over the T positions of KL(p || q) = sum_v p_v (log p_v - log q_v), nats; logits ``[T, V]``.

    Computed in float64 so KL values near 1e-9 are not rounding noise.
    """
    _same_shape(ref_logits, logits)
    logp = ref_logits.double().log_softmax(-1)  # [T, V]
    logq = logits.double().log_softmax(-1)  # [T, V]
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def mean_overlap(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over T of 1 - TV(p, q) = sum_v min(p_v, q_v); logits ``[T, V]``.

    With p the target and q the draft this is the expected per-token acceptance
    of speculative sampling at temperature 1 (Leviathan et al. 2023, "Fast
    Inference from Transformers via Speculative Decoding", section 3.3: alpha = E[min(p, q)]).
    """
    _same_shape(ref_logits, logits)
    p = ref_logits.double().softmax(-1)
    q = logits.double().softmax(-1)
    return float(torch.minimum(p, q).sum(-1).mean())


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [T, V] logits of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
