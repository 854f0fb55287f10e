"""``min_p`` and ``logit_bias`` with speculation on: applied at every draft position, as without speculation.

Fault (vLLM 0.32.0): ``SamplingParams._validate_spec_decode`` refuses any
request with ``min_p`` or ``logit_bias`` when speculative decoding is
configured ("not yet supported with speculative decoding", 400 with no
``param``), and ``build_logitsprocs`` builds only the ``MinTokens`` processor
when speculation is on. The reason is in
``RejectionSampler.apply_logits_processors``: of the per-request logits
processors it applies only ``MinTokens`` to the target logits at the draft
positions, so the verified tokens would ignore the others.

Fix: the rejection sampler applies both to the target logits of each request's
draft positions in the order the plain sampler uses (``Sampler.forward``):
``logit_bias`` before penalties (additive, with the processor's own
``biases``), ``min_p`` after temperature and before top-k/top-p (a token is
dropped when its probability is below ``min_p`` times the row's largest). The
target distribution p at every position is then the plain sampler's, and
speculative sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023) returns
samples of exactly p whatever the draft proposed. The refusal is lifted only
together with this, in the same plugin.
"""

from __future__ import annotations

import functools
import sys

import torch


def _processor(sampling_metadata, group: str, class_name: str):
    for proc in getattr(sampling_metadata.logitsprocs, group):
        if type(proc).__name__ == class_name:
            return proc
    return None


def add_logit_bias_at_draft_positions(logits, sampling_metadata, num_draft_tokens: list[int]):
    """Add each request's ``logit_bias`` to its draft-position rows, in place.

    Shapes: ``logits`` [num_draft_tokens_total, vocab], request i owning
    ``num_draft_tokens[i]`` consecutive rows. Returns ``logits``.
    """
    proc = _processor(sampling_metadata, "non_argmax_invariant", "LogitBiasLogitsProcessor")
    if proc is None or not proc.biases:
        return logits
    starts = [0]
    for n in num_draft_tokens:
        starts.append(starts[-1] + n)
    rows: list[int] = []
    token_ids: list[int] = []
    biases: list[float] = []
    for req, bias in proc.biases.items():
        if req >= len(num_draft_tokens):
            continue
        for row in range(starts[req], starts[req + 1]):
            rows.extend([row] * len(bias))
            token_ids.extend(bias.keys())
            biases.extend(bias.values())
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(token_ids, device=logits.device))
        logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)
    return logits


def apply_sampling_constraints(logits, cu_num_draft_tokens, sampling_metadata):
    """vLLM's ``rejection_sampler.apply_sampling_constraints`` plus ``min_p`` between temperature and top-k/top-p.

    Shapes: ``logits`` [num_tokens, vocab] (updated in place),
    ``cu_num_draft_tokens`` [batch] inclusive cumulative draft counts.
    """
    from vllm.v1.sample import rejection_sampler as rs

    if sampling_metadata.all_greedy:
        return logits
    num_tokens = logits.shape[0]
    temperature = rs.expand_batch_to_tokens(
        sampling_metadata.temperature, cu_num_draft_tokens, num_tokens,
        replace_from=rs.GREEDY_TEMPERATURE, replace_to=1,
    )  # fmt: skip
    logits.div_(temperature.unsqueeze(-1))
    proc = _processor(sampling_metadata, "argmax_invariant", "MinPLogitsProcessor")
    if proc is not None and proc.min_p_count and num_tokens:
        batch = cu_num_draft_tokens.shape[0]
        per_request = torch.zeros(batch, dtype=torch.float32, device=logits.device)  # [batch]
        known = proc.min_p.view(-1)[:batch]
        per_request[: known.shape[0]] = known
        min_p = rs.expand_batch_to_tokens(per_request, cu_num_draft_tokens, num_tokens)  # [num_tokens]
        probs = logits.softmax(dim=-1)  # [num_tokens, vocab]
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(-1)
        logits.masked_fill_(probs < threshold, float("-inf"))
    top_k = None
    if sampling_metadata.top_k is not None:
        top_k = rs.expand_batch_to_tokens(sampling_metadata.top_k, cu_num_draft_tokens, num_tokens)
    top_p = None
    if sampling_metadata.top_p is not None:
        top_p = rs.expand_batch_to_tokens(sampling_metadata.top_p, cu_num_draft_tokens, num_tokens)
    return rs.apply_top_k_top_p(logits, top_k, top_p)


def build_logitsprocs(original):
    """Wrap vLLM's ``build_logitsprocs`` so that with speculation on it builds every built-in processor.

    Custom processors stay refused with speculation (vLLM's own rule); only
    the built-ins (``MinTokens``, ``LogitBias``, ``MinP``), which the patched
    rejection sampler applies, are added back.
    """

    @functools.wraps(original)
    def build(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs=()):
        from vllm.v1.sample import logits_processor as lp

        if vllm_config.speculative_config and not is_pooling_model and not custom_logitsprocs:
            return lp.LogitsProcessors(
                ctor(vllm_config, device, is_pin_memory) for ctor in lp.BUILTIN_LOGITS_PROCESSORS
            )
        return original(vllm_config, device, is_pin_memory, is_pooling_model, custom_logitsprocs)

    build._qserve_patched = True
    return build


def patch() -> None:
    """Install both into the rejection sampler and lift the refusal (idempotent)."""
    from vllm import sampling_params
    from vllm.v1.sample import rejection_sampler as rs

    original = rs.RejectionSampler.apply_logits_processors
    if getattr(original, "_qserve_patched", False):
        return

    @functools.wraps(original)
    def apply_logits_processors(self, logits, sampling_metadata, metadata):
        logits = add_logit_bias_at_draft_positions(logits, sampling_metadata, metadata.num_draft_tokens)
        return original(self, logits, sampling_metadata, metadata)

    apply_logits_processors._qserve_patched = True
    rs.RejectionSampler.apply_logits_processors = apply_logits_processors
    rs.apply_sampling_constraints = apply_sampling_constraints
    from vllm.v1.sample import logits_processor as lp

    lp.build_logitsprocs = build_logitsprocs(lp.build_logitsprocs)
    runner = sys.modules.get("vllm.v1.worker.gpu_model_runner")
    if runner is not None:  # imported before the plugin ran: patch its own reference too
        runner.build_logitsprocs = lp.build_logitsprocs
    sampling_params.SamplingParams._validate_spec_decode = lambda self, speculative_config: None
