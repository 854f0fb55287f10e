"""The base weights a LoRA delta is added to: the original bf16, or the NF4 base as served.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
section 3, eq. 5) trains the adapter against ``doubleDequant(c1, c2, W_NF4)``:
the 4-bit NormalFloat weights, blocks of 64 with one absmax each, the absmaxes
themselves quantized to 8 bits in blocks of 256 ("double quantization"); we use blocks of
``server.precision.NF4_BLOCK_SIZE`` (see there why). A
QLoRA adapter therefore fits the dequantized NF4 weights, not the bf16 weights
they came from; merging it into bf16 adds it to the wrong base.

vLLM's bitsandbytes loader (``vllm_bnb_plugin`` 0.0.3,
``BitsAndBytesModelLoader._unquantized_generator``) quantizes each decoder
linear weight of a bf16 checkpoint in flight with
``quantize_4bit(w, compress_statistics=True, quant_type="nf4")``, its block size set to
``NF4_BLOCK_SIZE`` by ``server/engine/vllm_patches/nf4_block_size.py``, and computes with its dequantization. :func:`nf4_roundtrip` is
exactly that pair, so it gives the weights the served NF4 base computes with,
and applied to a merged weight it emulates serving the merge re-quantized.
NF4 is not idempotent here: ``nf4_roundtrip(nf4_roundtrip(w)) != nf4_roundtrip(w)``
in general (the double-quantized absmax is re-quantized; seen: max |diff|
5e-4 on a 384 x 384 weight), so re-quantizing a merge rounds twice.
"""

from __future__ import annotations

import torch

from server.peft import PROJECTIONS, module_path, parse_layer_module
from server.precision import NF4_BLOCK_SIZE, Precision


def is_quantized(name: str) -> bool:
    """Whether vLLM's bitsandbytes loader quantizes checkpoint tensor ``name``: the weight of one of a
    decoder layer's seven projections (embeddings, norms and the tied lm_head stay in the checkpoint dtype)."""
    path = name.removesuffix(".weight")
    layer_module = parse_layer_module(path) if path != name else None
    return layer_module is not None and layer_module[1] in PROJECTIONS and path == module_path(*layer_module)


def nf4_roundtrip(weight: torch.Tensor, block_size: int = NF4_BLOCK_SIZE) -> torch.Tensor:
    """``weight`` [out, in] quantized to NF4 and dequantized, as bitsandbytes and vLLM do.

    ``bitsandbytes.functional.quantize_4bit(w, blocksize=block_size, compress_statistics=True,
    quant_type="nf4")`` then ``dequantize_4bit``; ``block_size`` is the served one unless a
    benchmark compares others. The input is cast to bf16 first
    (the checkpoint dtype vLLM quantizes from); the result is bf16, same shape.

    Raises:
        ValueError: if ``weight`` is not a 2-D floating tensor.
    """
    import bitsandbytes.functional as bnbf

    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D float weight [out, in], got {tuple(weight.shape)} {weight.dtype}")
    w = weight.detach().to(torch.bfloat16).contiguous()  # [out, in]
    packed, state = bnbf.quantize_4bit(w, blocksize=block_size, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state)  # [out, in] bf16


def base_weights(state: dict[str, torch.Tensor], base: Precision) -> dict[str, torch.Tensor]:
    """The checkpoint ``state`` (name -> tensor) as the chosen merge ``base``.

    ``Precision.BF16`` returns the tensors unchanged (the same objects);
    ``Precision.NF4`` replaces every weight vLLM quantizes by its
    :func:`nf4_roundtrip` (bf16) and keeps the rest. ``state`` is not modified.
    """
    return dict(state) if base is Precision.BF16 else requantize(state)


def requantize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Emulate serving ``state`` with vLLM's in-flight NF4: every quantized weight round-tripped."""
    return {k: nf4_roundtrip(v) if is_quantized(k) else v for k, v in state.items()}
