"""Patches for the CPU sampling kernels of the rejection sampler (vLLM 0.32.0).

Patch ``empty-top-k``: with speculative decoding, a sampled request with
``top_k`` killed the engine for good (``max(): Expected reduction dim to be
specified for input.numel() == 0``). Root cause: in a step where no draft
tokens are verified, ``RejectionSampler.forward`` ->
``apply_sampling_constraints`` expands ``top_k`` to the zero draft positions
and calls ``apply_top_k_top_p`` with an empty ``[0, vocab]`` logits tensor; on
CPU that takes ``apply_top_k_only``, whose ``k.max()`` has no identity for an
empty tensor. Masking zero rows is a no-op, so the patch returns the empty
logits unchanged. Reproduction: docs/upstream/vllm_cpu_speculation_sampling.md.

Patch ``cpu-expand-kernel``: the deeper cause of both that crash and of sampled
speculation being wrong on CPU (acceptance 0.004 at temperature 1 against a
teacher-forced 0.82; garbage ``top_k`` values, "selected index k out of
range"). Without Triton, vLLM's CPU platform replaces the rejection sampler's
``expand_kernel`` (which spreads per-request temperature, top_k and top_p over
each request's draft positions) with ``cpu_triton_utils._expand_kernel_impl``.
That function passes ``output.to(torch.int64)`` to the C++ kernel: for the
float32 temperature/top_p and int32 top_k outputs this is a *copy*, so the
kernel writes into a temporary and the real output keeps the uninitialised
memory of ``new_empty``; the float inputs are also truncated to integers. The
patch installs a pure-torch implementation with the same contract before the
platform registers its overrides (vLLM loads general plugins first, see
``WorkerBase.init_worker``).
"""

from __future__ import annotations

import functools


def patch_empty_top_k() -> None:
    from vllm.v1.sample.ops import topk_topp_sampler as mod

    original = mod.apply_top_k_only
    if getattr(original, "_qserve_patched", False):
        return

    @functools.wraps(original)
    def apply_top_k_only(logits, k):  # logits: [num_tokens, vocab], k: [num_tokens]
        if logits.shape[0] == 0:
            return logits
        return original(logits, k)

    apply_top_k_only._qserve_patched = True
    mod.apply_top_k_only = apply_top_k_only


def expand_to_tokens(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None) -> None:  # noqa: N803
    """Write ``input_val[i]`` (``replace_from`` -> ``replace_to``) into request i's slots of ``output``, in place.

    Shapes: ``output`` [num_tokens]; ``input_val`` [batch]; ``cu_num_tokens``
    [batch], the inclusive cumulative token counts. Same contract as vLLM's
    Triton ``expand_kernel``; dtypes are kept (no integer round trip).
    """
    import torch

    counts = torch.diff(cu_num_tokens.to(torch.int64), prepend=cu_num_tokens.new_zeros(1, dtype=torch.int64))
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    expanded = torch.repeat_interleave(values, counts)  # [cu_num_tokens[-1]]
    output[: expanded.shape[0]].copy_(expanded)


def patch_cpu_expand_kernel() -> None:
    from vllm.utils import cpu_triton_utils

    cpu_triton_utils._expand_kernel_impl = expand_to_tokens


def patch() -> None:
    """Apply both CPU rejection-sampler fixes (:func:`patch_empty_top_k`, :func:`patch_cpu_expand_kernel`)."""
    patch_empty_top_k()
    patch_cpu_expand_kernel()
