"""vllm_patches.nf4_block_size: vLLM's bitsandbytes loader quantizes with the block size it is given, and only while loading."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import torch

from server.engine.vllm_patches import nf4_block_size
from server.precision import NF4_BLOCK_SIZE


def test_the_loader_generators_quantize_with_our_block_size_and_restore_the_default():
    from vllm_bnb_plugin.bitsandbytes_loader import BitsAndBytesModelLoader

    nf4_block_size.patch()
    seen = []

    def fake_generator(self, weights):
        from bitsandbytes.functional import quantize_4bit  # as the plugin imports it: at call time

        for w in weights:
            packed, state = quantize_4bit(w, compress_statistics=True, quant_type="nf4")
            seen.append(state.blocksize)
            yield packed

    other = 32 if NF4_BLOCK_SIZE != 32 else 128  # a size bitsandbytes does not default to
    wrapped = nf4_block_size._with_block_size(fake_generator, other)
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    assert len(list(wrapped(None, [w, w]))) == 2
    assert seen == [other, other]
    # outside loading, bitsandbytes keeps its own default (64)
    assert bnbf.quantize_4bit(w, quant_type="nf4")[1].blocksize == 64
    for name in nf4_block_size.GENERATORS:
        assert getattr(BitsAndBytesModelLoader, name)._qserve_patched
