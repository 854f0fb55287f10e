"""Greedy output independent of the batch: one-row matmuls take the kernel every other row count takes.

Fault (vLLM 0.32.0 CPU build, torch 2.13 oneDNN, bf16): ``torch.nn.functional.linear`` with a
single input row runs a matrix-vector kernel whose fp32 accumulation order differs from the
matrix-matrix kernel every row count of 2 or more runs. About 1.5 outputs in 10,000 then round
to a neighbouring bf16 value (measured: 45 of 294,912 for a 1536 -> 576 projection; all row
counts 2-512 agree exactly with each other). A decode step alone (one row per linear) and the same
step in a batch, in a speculative verify (k + 1 rows) or in a mixed LoRA batch therefore differ
by one bf16 ulp here and there; bf16 activations carry such a flip through 30 layers and every
later step, and the real pair's logprobs on the same prefix drifted 0.1-0.25 nats apart (greedy
texts then part). Every other op of the model (RMSNorm, rotary, SiLU, the CPU attention kernel,
NF4 dequantization) gave identical rows whatever the batch (``BENCHMARKS.md``, "Exactness").

Fix: a linear over one row is computed over that row twice (a 2-row matmul) and keeps the first,
so each row goes through the same kernel whatever the batch. Applied to the target's and the
draft's projections (bitsandbytes NF4 and unquantized) and to the logits head. Opt-in
(``--batch-invariant``): in its benchmark the servers with it ran at 0.95-0.99x the tokens/s of
those without (medians of three repeats under ~5% noise; ``BENCHMARKS.md``, "Exactness"), short of
the 0.97 at every cell set before the run for making it the default.
vLLM's own ``VLLM_BATCH_INVARIANT`` mode covers CUDA kernels only.
"""

from __future__ import annotations

import functools
import inspect


def two_rows(fn, x_name: str):
    """Wrap method ``fn`` so that its 2-D argument ``x_name`` of one row ([1, K]) runs as [2, K].

    Returns ``fn``'s result for the first row ([1, N]); other inputs pass through unchanged.
    Raises RuntimeError when ``fn`` has no parameter ``x_name`` (vLLM renamed it: the patch cannot apply).
    """
    names = list(inspect.signature(fn).parameters)
    if x_name not in names:
        raise RuntimeError(f"{fn.__qualname__} has no parameter {x_name!r} (its parameters: {names})")
    position = names.index(x_name) - 1  # in args, which exclude self

    @functools.wraps(fn)
    def wrapped(self, *args, **kwargs):
        by_name = x_name in kwargs
        x = kwargs[x_name] if by_name else args[position]
        if x.dim() != 2 or x.shape[0] != 1:
            return fn(self, *args, **kwargs)
        x = x.expand(2, -1).contiguous()
        if by_name:
            kwargs = {**kwargs, x_name: x}
        else:
            args = (*args[:position], x, *args[position + 1 :])
        return fn(self, *args, **kwargs)[:1]

    wrapped._qserve_patched = True
    return wrapped


def patch() -> None:
    """Route one-row projections and logits through the many-row kernel (idempotent)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm_bnb_plugin.quantization.linear import BitsAndBytesLinearMethod

    for owner, name, x_name in (
        (BitsAndBytesLinearMethod, "apply", "x"),
        (UnquantizedLinearMethod, "apply", "x"),
        (LogitsProcessor, "_apply_head", "hidden_states"),
    ):
        original = getattr(owner, name)
        if not getattr(original, "_qserve_patched", False):
            setattr(owner, name, two_rows(original, x_name))
