"""The one precision type: how a model's linear weights are held, as stored (bf16) or 4-bit NF4.

NF4 is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA", section 3), as bitsandbytes and
vLLM's in-flight quantization compute it (``server/merge/weights/nf4.py``). A merge names two
precisions with this type: its ``merge_base`` (the base weights the LoRA delta is added to) and its
``precision`` (how the merged model is served).
"""

from __future__ import annotations

from enum import StrEnum


class Precision(StrEnum):
    """Linear-weight precision: ``nf4`` (4-bit NormalFloat, blocksize 64) or ``bf16``."""

    NF4 = "nf4"
    BF16 = "bf16"
