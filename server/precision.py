"""The one precision type: how a model's linear weights are held, as stored (bf16) or 4-bit NF4.

NF4 is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", section 3), as bitsandbytes and
vLLM's in-flight quantization compute it (``server/merge/weights/nf4.py``). A merge names two
precisions with this type: its ``merge_base`` (the base weights the LoRA delta is added to) and its
``precision`` (how the merged model is served).
"""

from __future__ import annotations

from enum import StrEnum

# Weights per NF4 block (one absmax each): bitsandbytes' default, 64. The real model's only source is a
# Q4_1 GGUF (one scale and minimum per 32 weights), and blocks of 32 fit it better: on 24 held-out chat
# answers KL(bf16 || NF4) is 0.237 nats/token at 32 against 0.287 at 64 (BENCHMARKS.md, "NF4 block
# size"). It stays 64 because the block size belongs to a base and its QLoRA adapters, and this is one
# value for every pair: the demo pair's adapters were trained at 64, and at 32 its draft's merged
# greedy agreement fell from 1.0 to 0.992 (tests/test_merge_api.py). vLLM's in-flight quantization
# (server/engine/vllm_patches/nf4_block_size.py), merges and QLoRA training all read this one value.
NF4_BLOCK_SIZE = 64


class Precision(StrEnum):
    """Linear-weight precision: ``nf4`` (4-bit NormalFloat, blocks of ``NF4_BLOCK_SIZE``) or ``bf16``."""

    NF4 = "nf4"
    BF16 = "bf16"
