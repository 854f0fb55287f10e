"""The one precision type: how a model's linear weights are held, as stored (bf16) or 4-bit NF4.

NF4 is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", section 3), as bitsandbytes and
vLLM's in-flight quantization compute it (``server/merge/weights/nf4.py``). A merge names two
precisions with this type: its ``merge_base`` (the base weights the LoRA delta is added to) and its
``precision`` (how the merged model is served).
"""

from __future__ import annotations

from enum import StrEnum

# Weights per NF4 block (one absmax each). bitsandbytes defaults to 64; we use 32 because the real
# model's only source is a Q4_1 GGUF (4-bit, one scale and minimum per 32 weights), whose blocks NF4
# blocks of 64 straddle. Measured on SmolLM2-135M-Instruct, 24 held-out chat answers (BENCHMARKS.md,
# "NF4 block size"): KL(bf16 || NF4) 0.287 nats/token at 64, 0.237 at 32, for 1.6 MiB more absmax.
# vLLM's in-flight quantization (server/engine/vllm_patches/nf4_block_size.py), merges and QLoRA
# training all read this one value.
NF4_BLOCK_SIZE = 32


class Precision(StrEnum):
    """Linear-weight precision: ``nf4`` (4-bit NormalFloat, blocks of ``NF4_BLOCK_SIZE``) or ``bf16``."""

    NF4 = "nf4"
    BF16 = "bf16"
