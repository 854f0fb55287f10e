"""Base requests batched with adapter requests are computed without LoRA on CPU (no slot -1 wrap-around).

Fault (vLLM 0.32.0, CPU): ``PunicaWrapperCPU`` applies LoRA through the pure
torch ops in ``vllm/lora/ops/torch_ops/lora_ops.py``; ``bgmv_shrink``,
``bgmv_expand`` and ``bgmv_expand_slice`` select each token's weights with
``lora_weights[lora_indices_tensor]``. A token of a request without an
adapter has index -1, and Python indexing wraps -1 to the *last* LoRA slot
(``max_loras - 1``). While that slot is empty (zeros) nothing shows; once
``max_loras`` adapters are resident, every base request in a batch with an
adapter request is computed with the last slot's adapter. Seen here: with 8
adapters over 4 slots, 8 of 8 greedy base outputs changed in a busy batch,
with and without speculation; with ``max_loras=1`` every mixed batch (the
stack notes' "LoRA slots and mixed batches" fault). vLLM's Triton kernels
skip index -1; the CPU fallback does not.

Fix: before each of the three ops, zero the input rows of tokens with index
-1 and clamp their index to 0, so those rows contribute exactly 0 (shrink
writes 0, expand adds B @ 0 = 0). ``sgmv_*`` call the ``bgmv_*`` module
globals, so they are covered too.
"""

from __future__ import annotations

import functools
import sys


def without_lora_rows(fn):
    """Wrap a ``bgmv_*(inputs [tokens, d_in], weights [slots, ...], output [tokens, d_out], indices [tokens], ...)`` op
    so that tokens with index -1 (no adapter) add nothing."""
    if getattr(fn, "_qserve_patched", False):
        return fn

    @functools.wraps(fn)
    def op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        no_lora = lora_indices_tensor < 0
        if inputs.shape[0] == lora_indices_tensor.shape[0] and bool(no_lora.any()):
            inputs = inputs.masked_fill(no_lora.view(-1, 1), 0)
            lora_indices_tensor = lora_indices_tensor.clamp(min=0)
        return fn(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    op._qserve_patched = True
    op._qserve_reads = ("inputs", "lora_indices_tensor")  # by position: pinned in tests/test_vllm_patch_pins.py
    return op


def install_lora_op(name: str, op) -> None:
    """Make ``op`` vLLM's CPU LoRA op ``name`` where it is defined and where it was imported by name;
    ``sgmv_*`` call the ``bgmv_*`` module globals, so they use it too."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops

    setattr(lora_ops, name, op)
    setattr(torch_ops, name, op)
    cpu = sys.modules.get("vllm.lora.punica_wrapper.punica_cpu")
    if cpu is not None and hasattr(cpu, name):
        setattr(cpu, name, op)


def patch() -> None:
    """Wrap the three ops (idempotent: a wrapped op is left as it is)."""
    from vllm.lora.ops.torch_ops import lora_ops

    for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
        install_lora_op(name, without_lora_rows(getattr(lora_ops, name)))
