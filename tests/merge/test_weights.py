"""Merge tensor functions against readable references: bitsandbytes' own NF4, LoRA's forward, the zero adapter."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from server.merge.weights.lora import LoraFactors, MergeRefused, load_lora, lora_scale, merge_lora
from server.merge.weights.nf4 import base_weights, is_quantized, nf4_roundtrip, requantize
from server.precision import NF4_BLOCK_SIZE, Precision
from testing.process import REPO_ROOT

TARGET = REPO_ROOT / "models/target"


@pytest.fixture(scope="module")
def state():
    from server.merge.weights.checkpoint import read_state

    return read_state(TARGET)


def test_nf4_roundtrip_is_bitsandbytes_nf4_with_double_quant(state):
    w = state["model.layers.0.self_attn.q_proj.weight"]  # [384, 384] bf16
    packed, qs = bnbf.quantize_4bit(w, blocksize=NF4_BLOCK_SIZE, compress_statistics=True, quant_type="nf4")
    assert qs.blocksize == NF4_BLOCK_SIZE and qs.nested and qs.quant_type == "nf4"
    assert torch.equal(nf4_roundtrip(w), bnbf.dequantize_4bit(packed, qs))
    # and it is what a transformers QLoRA user's Linear4bit holds (Params4bit, same settings)
    import bitsandbytes as bnb

    p = bnb.nn.Params4bit(
        w.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=NF4_BLOCK_SIZE
    )
    p = p._quantize("cpu")
    assert torch.equal(nf4_roundtrip(w), bnbf.dequantize_4bit(p.data, p.quant_state))


def test_only_decoder_linears_are_quantized(state):
    quantized = sorted(k for k in state if is_quantized(k))
    assert len(quantized) == 6 * 7
    assert not is_quantized("model.embed_tokens.weight") and not is_quantized("model.norm.weight")
    nf4 = base_weights(state, Precision.NF4)
    for k, v in state.items():
        assert torch.equal(nf4[k], v) != is_quantized(k), k  # every quantized weight moves, nothing else does


@pytest.mark.parametrize("merge_base", list(Precision))
def test_zero_adapter_merges_bit_identically(state, merge_base):
    base = base_weights(state, merge_base)
    zero = {
        k: LoraFactors(a=torch.randn(16, v.shape[1]), b=torch.zeros(v.shape[0], 16), scale=2.0)
        for k, v in base.items()
        if is_quantized(k)
    }
    merged = merge_lora(base, zero)
    assert merged.keys() == base.keys()
    for k in base:
        assert merged[k].dtype == base[k].dtype == torch.bfloat16
        assert merged[k].view(torch.int16).equal(base[k].view(torch.int16)), k  # bits, -0.0 included


def test_zero_adapter_on_bf16_served_nf4_is_the_nf4_base(state):
    zero = {
        k: LoraFactors(torch.randn(4, v.shape[1]), torch.zeros(v.shape[0], 4), 2.0)
        for k, v in state.items()
        if is_quantized(k)
    }
    served = requantize(merge_lora(state, zero))
    nf4_base = base_weights(state, Precision.NF4)
    assert all(served[k].view(torch.int16).equal(nf4_base[k].view(torch.int16)) for k in state)


def test_merged_linear_equals_base_plus_lora_forward():
    torch.manual_seed(0)
    w = torch.randn(96, 64).to(torch.bfloat16)  # [out, in]
    a, b = torch.randn(8, 64) / 8, torch.randn(96, 8) / 8  # [r, in], [out, r]
    f = LoraFactors(a=a, b=b, scale=32 / 8)
    merged = merge_lora({"m.weight": w}, {"m.weight": f}, dtype=torch.float32)["m.weight"]
    x = torch.randn(5, 64)  # [tokens, in]
    lora_forward = x @ w.float().T + f.scale * (x @ a.T) @ b.T  # Hu et al. 2021, eq. (3)
    torch.testing.assert_close(x @ merged.T, lora_forward, rtol=1e-5, atol=1e-5)


def test_shipped_adapter_factors_match_peft_names_and_scale():
    lora = load_lora(REPO_ROOT / "adapters/demo/austen")
    assert len(lora) == 6 * 7 and all(is_quantized(k) for k in lora)
    f = lora["model.layers.0.mlp.down_proj.weight"]
    assert f.a.shape == (16, 1024) and f.b.shape == (384, 16) and f.scale == 2.0


def test_scale_and_refusals():
    q = {"target_modules": ["q_proj"]}
    assert lora_scale({"r": 16, "lora_alpha": 32, **q}) == 2.0
    assert lora_scale({"r": 16, "lora_alpha": 32, "use_rslora": True, **q}) == 8.0
    assert lora_scale({"r": 16, **q}) == 0.5  # PEFT's default lora_alpha is 8, as validation and serving read it
    for bad in ({"r": 0, **q}, {"r": 8, "use_dora": True, **q}, {"r": 8, "alpha_pattern": {"q_proj": 4}, **q}):
        with pytest.raises(MergeRefused):
            lora_scale(bad)
    with pytest.raises(MergeRefused, match="does not have"):
        merge_lora({"a.weight": torch.zeros(2, 2)}, {"b.weight": LoraFactors(torch.zeros(1, 2), torch.zeros(2, 1), 1)})
    with pytest.raises(MergeRefused, match="base weight is"):
        merge_lora({"a.weight": torch.zeros(3, 2)}, {"a.weight": LoraFactors(torch.zeros(1, 2), torch.zeros(2, 1), 1)})


@pytest.mark.parametrize("adapter", ["austen", "stdlib-docs"])
def test_each_shipped_adapter_has_a_draft_adapter_that_merges_into_the_draft(adapter):
    from server.merge.weights.checkpoint import read_state

    draft = read_state(REPO_ROOT / "models/draft")
    lora = load_lora(REPO_ROOT / "adapters/demo" / adapter / "draft")
    assert len(lora) == 3 * 7  # every projection of the draft's 3 layers
    base = base_weights(draft, Precision.NF4)
    merged = merge_lora(base, lora)
    assert merged.keys() == draft.keys()
    assert all(not torch.equal(merged[k], base[k]) for k in lora)  # a trained B is not 0
