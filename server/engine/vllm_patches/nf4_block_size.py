"""NF4 block size for vLLM's in-flight quantization (vllm_bnb_plugin 0.0.3 beside vLLM 0.32.0).

Root cause: ``BitsAndBytesModelLoader._unquantized_generator`` (and its pre-quantized twin for
weights a checkpoint left unquantized) calls ``bitsandbytes.functional.quantize_4bit(w,
compress_statistics=True, quant_type="nf4")`` with no ``blocksize``, so every in-flight NF4 model
gets bitsandbytes' default of 64 weights per absmax, and no engine argument or quantization config
field reaches it. Our real model's source is Q4_1 (blocks of 32), where blocks of 32 lower
KL(bf16 || NF4) from 0.287 to 0.237 nats/token; ``server/precision.py`` says why it is 64 today.
The patch runs each loader generator with ``quantize_4bit``'s default block size set to ``server.precision.NF4_BLOCK_SIZE``; the generators import the function at call
time from ``bitsandbytes.functional``, so the swap covers exactly the loading of one model's weights.
The quantized weights carry their block size in their ``QuantState``, which every later
dequantization reads, so nothing after loading needs a change. Upstream: a ``bnb_4bit_blocksize``
field in the plugin's ``BitsAndBytesConfig`` passed to both calls would remove this patch.
"""

from __future__ import annotations

import contextlib
import functools

GENERATORS = ("_unquantized_generator", "_quantized_4bit_generator")


@contextlib.contextmanager
def _default_block_size(block_size: int):
    """Within the block, ``bitsandbytes.functional.quantize_4bit`` defaults to ``blocksize=block_size``."""
    import bitsandbytes.functional as bnbf

    original = bnbf.quantize_4bit
    bnbf.quantize_4bit = functools.partial(original, blocksize=block_size)
    try:
        yield
    finally:
        bnbf.quantize_4bit = original


def _with_block_size(generator, block_size: int):
    @functools.wraps(generator)
    def wrapped(self, *args, **kwargs):
        with _default_block_size(block_size):
            yield from generator(self, *args, **kwargs)

    wrapped._qserve_patched = True
    return wrapped


def patch() -> None:
    """Make the bitsandbytes loader quantize with blocks of ``NF4_BLOCK_SIZE`` weights."""
    from vllm_bnb_plugin.bitsandbytes_loader import BitsAndBytesModelLoader

    from server.precision import NF4_BLOCK_SIZE

    for name in GENERATORS:
        generator = getattr(BitsAndBytesModelLoader, name, None)
        if generator is None or getattr(generator, "_qserve_patched", False):
            continue
        setattr(BitsAndBytesModelLoader, name, _with_block_size(generator, NF4_BLOCK_SIZE))
