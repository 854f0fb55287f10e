"""What weights cost once served, in bytes (for the merge report and unmerge), from parameter counts.

bf16: 2 bytes a parameter. NF4 as vLLM's bitsandbytes loader stores a quantized
weight of n parameters (QLoRA, Dettmers et al. 2023, sections 3.1-3.2; bitsandbytes
``quantize_4bit(blocksize=NF4_BLOCK_SIZE, compress_statistics=True)``): n/2 bytes of packed
4-bit codes, one uint8 absmax per block of ``NF4_BLOCK_SIZE`` (double-quantized), one float32
absmax per 256 of those, the float32 offset, the 256-entry float32 8-bit code of
the nested quantization and the 16-entry float32 NF4 code. Embeddings and norms
stay bf16. Counted from the safetensors header: nothing is loaded or quantized.
Engine overheads (KV cache, activations, vLLM's own buffers) are not included.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from server.merge.weights.nf4 import is_quantized
from server.precision import NF4_BLOCK_SIZE, Precision

NESTED_BLOCKSIZE = 256


def nf4_bytes(n: int) -> int:
    """Bytes bitsandbytes holds for an NF4 double-quantized weight of ``n`` parameters."""
    blocks = math.ceil(n / NF4_BLOCK_SIZE)
    nested = math.ceil(blocks / NESTED_BLOCKSIZE)
    return math.ceil(n / 2) + blocks + 4 * nested + 4 + 4 * 256 + 4 * 16


def tensor_sizes(weights: Path) -> dict[str, int]:
    """``{name: parameter count}`` from a safetensors file's header (the tensors are not read)."""
    with open(weights, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def weight_bytes(sizes: dict[str, int], serve: Precision) -> int:
    """Bytes of weights ``{name: parameter count}`` served at ``serve``: bf16, or NF4 (decoder linears quantized)."""
    if serve is Precision.BF16:
        return 2 * sum(sizes.values())
    return sum(nf4_bytes(n) if is_quantized(k) else 2 * n for k, n in sizes.items())
