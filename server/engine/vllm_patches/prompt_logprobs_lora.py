"""Prompt logprobs (``echo`` with ``logprobs``) with LoRA enabled no longer kill the engine in a busy batch.

Fault (vLLM 0.32.0, CPU; upstream vllm-project/vllm#29955 and #17766, fix proposed for the GPU path in
#51597): ``GPUModelRunner._get_prompt_logprobs_dict`` computes each request's prompt logits with
``model.compute_logits(hidden_states[offset : offset + n])``. With LoRA enabled the output layer is a
``LogitsProcessorWithLoRA``, whose ``punica_wrapper.add_lora_logits`` picks each row's adapter from
``sampler_indices``: one entry per *request* of the batch, not per prompt token. For a batch of one request
the single entry broadcasts over the rows; with several, vLLM's ``einsum`` fails ("subscript b has size 12
for operand 1 which does not broadcast with previously seen size 16") inside the worker and the engine dies,
failing every request in flight. Repro: tests/test_prompt_logprobs_lora.py (``echo=True, logprobs=1`` on
the base model and two adapters, twelve at once; without this patch the server answers 503).

Fix: while ``_get_prompt_logprobs_dict`` runs, ``add_lora_logits`` takes the rows' per-token indices
(``token_lora_indices``, one per token of the forward pass). The rows it gets are a contiguous row slice of
the hidden states that method was called with, so their first row's position there is their first token's
position in the batch (the mapping #51597 installs by swapping the GPU path's prompt mapping).
"""

from __future__ import annotations

import contextvars
import functools

import torch

# The hidden states [tokens, hidden] of the forward pass whose prompt logprobs are being computed.
_prompt_hidden: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("prompt_hidden", default=None)


def token_rows(hidden: torch.Tensor, x: torch.Tensor) -> slice:
    """The rows of ``hidden`` [tokens, hidden] that ``x`` [n, hidden] is a view of, as a slice.

    Raises:
        RuntimeError: ``x`` is not a contiguous row slice of ``hidden`` (vLLM changed how it slices them).
    """
    size = hidden.element_size()
    delta = x.data_ptr() - hidden.data_ptr()
    row_bytes = hidden.stride(0) * size
    same = x.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr() and x.stride() == hidden.stride()
    same = same and x.shape[1:] == hidden.shape[1:]
    if not same or delta < 0 or delta % row_bytes or delta // row_bytes + x.shape[0] > hidden.shape[0]:
        raise RuntimeError(
            "prompt_logprobs_lora: the prompt rows are not a row slice of the step's hidden states "
            f"(vLLM {hidden.shape} / {x.shape}); re-read GPUModelRunner._get_prompt_logprobs_dict"
        )
    start = delta // row_bytes
    return slice(start, start + x.shape[0])


def _while_computing_prompt_logprobs(fn):
    @functools.wraps(fn)
    def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        token = _prompt_hidden.set(hidden_states)
        try:
            return fn(self, hidden_states, num_scheduled_tokens)
        finally:
            _prompt_hidden.reset(token)

    _get_prompt_logprobs_dict._qserve_patched = True
    return _get_prompt_logprobs_dict


def _per_token_indices(fn):
    @functools.wraps(fn)
    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        hidden = _prompt_hidden.get()
        if hidden is None:
            return fn(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
        from vllm.lora.punica_wrapper import punica_cpu  # its op globals: the installed (grouped) ops

        indices = self.token_lora_indices[token_rows(hidden, x)]  # [n]
        y = y.view(-1, y.shape[-1])
        x = x.view(-1, x.shape[-1])
        if buffer is None:  # fp32, as vLLM's own add_lora_logits
            buffer = torch.zeros((x.size(0), lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
        punica_cpu.bgmv_shrink(x, lora_a_stacked, buffer, indices, scale)
        punica_cpu.bgmv_expand(buffer, lora_b_stacked, y, indices, add_inputs=True)

    add_lora_logits._qserve_patched = True
    return add_lora_logits


def patch() -> None:
    """Wrap ``GPUModelRunner._get_prompt_logprobs_dict`` and ``PunicaWrapperCPU.add_lora_logits`` (idempotent)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for owner, name, wrap in (
        (GPUModelRunner, "_get_prompt_logprobs_dict", _while_computing_prompt_logprobs),
        (PunicaWrapperCPU, "add_lora_logits", _per_token_indices),
    ):
        fn = getattr(owner, name)
        if not getattr(fn, "_qserve_patched", False):
            setattr(owner, name, wrap(fn))
