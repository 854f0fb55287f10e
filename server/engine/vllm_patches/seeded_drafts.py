"""Seeded requests stay reproducible with speculation on: the draft samples with the request's generator.

Fault (vLLM 0.32.0): with ``draft_sample_method="probabilistic"`` the draft
model samples its proposals in
``vllm.v1.spec_decode.llm_base_proposer.compute_probs_and_sample_next_token``
from the global RNG (the source says ``TODO(woosuk): Consider seeds.``). The
rejection sampler then verifies those proposals with the request's own
``torch.Generator`` (uniforms and recovered-token noise), but which tokens it
sees, and so the output, depend on unseeded noise: the same ``seed`` gave three
different texts in three runs. Without speculation it gave one.

Fix: draw the exponential noise of a seeded request's row from that request's
generator (``sampling_metadata.generators``, keyed by batch row), the same way
the plain sampler and the rejection sampler do. The sampling rule is unchanged
(exponential-race / Gumbel-max sampling from the draft's q), so the output
distribution is untouched; only where the randomness comes from changes.
Unseeded requests keep the global RNG.
"""

from __future__ import annotations

import functools

import torch


def compute_probs_and_sample_next_token(logits, sampling_metadata, use_fp64_gumbel: bool = False):
    """Sample draft tokens from ``softmax(logits / temperature)``, seeded rows from their generators.

    Shapes: ``logits`` [num_rows, vocab] (one row per request in the batch, the
    draft step's last positions); returns ``(token_ids [num_rows], probs
    [num_rows, vocab] float32)``. Greedy rows (temperature < eps) take the
    argmax. Same contract as vLLM's function of the same name.
    """
    from vllm.v1.sample.ops.topk_topp_sampler import empty_exponential_noise_like, sample_with_exponential_noise
    from vllm.v1.sample.sampler import _SAMPLING_EPS

    if sampling_metadata.all_greedy:
        return logits.argmax(dim=-1), logits
    temperature = sampling_metadata.temperature  # [num_rows]
    if not sampling_metadata.all_random:
        is_greedy = temperature < _SAMPLING_EPS
        temperature = torch.where(is_greedy, 1.0, temperature)
    logits.div_(temperature.view(-1, 1))
    probs = logits.softmax(dim=-1, dtype=torch.float32)  # [num_rows, vocab]
    q = empty_exponential_noise_like(probs, use_fp64_gumbel)
    q.exponential_()
    for row, generator in sampling_metadata.generators.items():
        if row < q.shape[0]:
            q[row].exponential_(generator=generator)
    next_token_ids = sample_with_exponential_noise(probs.clone(), q)
    if not sampling_metadata.all_random:
        next_token_ids = torch.where(is_greedy, probs.argmax(dim=-1), next_token_ids)
    return next_token_ids, probs


def patch() -> None:
    """Install the seeded draft sampler in ``llm_base_proposer`` (idempotent)."""
    from vllm.v1.spec_decode import llm_base_proposer as mod

    original = mod.compute_probs_and_sample_next_token
    if getattr(original, "_qserve_patched", False):
        return

    @functools.wraps(original)
    def patched(logits, sampling_metadata, use_fp64_gumbel=False):
        rows_match = sampling_metadata.temperature is None or sampling_metadata.temperature.shape[0] == logits.shape[0]
        if not sampling_metadata.generators or not rows_match:
            return original(logits, sampling_metadata, use_fp64_gumbel)
        return compute_probs_and_sample_next_token(logits, sampling_metadata, use_fp64_gumbel)

    patched._qserve_patched = True
    mod.compute_probs_and_sample_next_token = patched
