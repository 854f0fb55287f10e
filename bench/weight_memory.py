"""Weight memory of a checkpoint in bf16 and in NF4, quantized as vLLM's bitsandbytes loader does.

vLLM's bitsandbytes plugin quantizes every linear layer of the transformer
blocks with ``bitsandbytes.functional.quantize_4bit(quant_type="nf4",
compress_statistics=True)`` (NF4 with double quantization, QLoRA: Dettmers et
al. 2023, sections 3.1-3.2) and keeps embeddings and norms in bf16. We run the
same bitsandbytes call on the same tensors and count the bytes it stores.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from server.peft import PROJECTIONS
from server.precision import NF4_BLOCK_SIZE

LINEAR_SUFFIXES = tuple(f"{name}.weight" for name in PROJECTIONS)


def _state_bytes(state) -> int:
    """Bytes held by a bitsandbytes ``QuantState`` (absmax, nested absmax, codebook)."""
    total = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        s2 = state.state2
        total += s2.absmax.numel() * s2.absmax.element_size() + s2.code.numel() * s2.code.element_size()
        total += 4  # the fp32 offset
    return total + state.code.numel() * state.code.element_size()


def weight_bytes(model_dir: Path) -> dict[str, int]:
    """Return ``{"bf16": bytes, "nf4": bytes, "quantized_params": n, "kept_params": n}`` for ``model_dir``.

    Tensors: every ``*.safetensors`` tensor of the folder. Units: bytes.
    """
    import bitsandbytes.functional as bnbf

    bf16 = nf4 = quantized = kept = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, tensor in load_file(path).items():
            bf16 += tensor.numel() * 2
            if name.endswith(LINEAR_SUFFIXES):
                packed, state = bnbf.quantize_4bit(
                    tensor.to(torch.bfloat16), blocksize=NF4_BLOCK_SIZE, quant_type="nf4", compress_statistics=True
                )
                nf4 += packed.numel() * packed.element_size() + _state_bytes(state)
                quantized += tensor.numel()
            else:
                nf4 += tensor.numel() * 2
                kept += tensor.numel()
    return {"bf16": bf16, "nf4": nf4, "quantized_params": quantized, "kept_params": kept}
