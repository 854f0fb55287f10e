"""A restacked LoRA layer holds what vLLM wrote into its slices, and its two-matmul forward adds what vLLM's
per-slice shrink and expand ops add (through the real engine: tests/test_cpu_lora_grouped.py)."""

from types import SimpleNamespace

import pytest
import torch

from server.engine.vllm_patches import cpu_lora_fused as fused
from tests.lora_reference import vllm_lora_ops

SLOTS, RANK, D_IN, OUTS = 4, 8, 64, (64, 16, 16)  # a q/k/v-shaped layer


@pytest.fixture
def layer():
    """A stand-in for a vLLM linear LoRA layer: per-slice stacked A [slots, 1, r, in] and B [slots, 1, out_s, r]."""
    torch.manual_seed(0)
    return SimpleNamespace(
        lora_a_stacked=tuple(torch.randn(SLOTS, 1, RANK, D_IN, dtype=torch.bfloat16) / 8 for _ in OUTS),
        lora_b_stacked=tuple(torch.randn(SLOTS, 1, o, RANK, dtype=torch.bfloat16) / 4 for o in OUTS),
        output_slices=OUTS,
    )


def _per_slice(layer, y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``y`` plus the LoRA term as vLLM's CPU wrapper computes it: per slice, a float32 shrink, then an expand
    into the slice's columns (tokens with index -1 given no term, as ``cpu_lora_index`` makes vLLM do)."""
    ops, y, offset = vllm_lora_ops(), y.clone(), 0
    for a, b, out in zip(layer.lora_a_stacked, layer.lora_b_stacked, OUTS, strict=True):
        buffer = torch.zeros(x.shape[0], RANK)
        ops.bgmv_shrink(x.masked_fill((idx < 0)[:, None], 0), a, buffer, idx.clamp(min=0), 1.0)
        ops.bgmv_expand_slice(buffer, b, y, idx.clamp(min=0), offset, out, True)
        offset += out
    return y


def test_restacking_keeps_the_weights_and_vllms_writes_reach_the_stacked_tensors(layer):
    before = [t.clone() for t in (*layer.lora_a_stacked, *layer.lora_b_stacked)]
    assert fused.restack(layer)
    for old, new in zip(before, (*layer.lora_a_stacked, *layer.lora_b_stacked), strict=True):
        assert torch.equal(old, new) and new.shape == old.shape
    a_big, b_big = getattr(layer.lora_a_stacked[0], fused.FUSED)
    assert a_big.shape == (SLOTS, 3 * RANK, D_IN) and b_big.shape == (SLOTS, sum(OUTS), 3 * RANK)
    layer.lora_b_stacked[1][2] = 0  # vLLM's reset_lora
    assert (b_big[2, 64:80, RANK : 2 * RANK] == 0).all() and (b_big[2, :64, :RANK] != 0).any()
    layer.lora_a_stacked[2][3, 0, :4].copy_(torch.ones(4, D_IN))  # vLLM's set_lora, a rank-4 adapter
    assert (a_big[3, 2 * RANK : 2 * RANK + 4] == 1).all()
    assert (b_big[:, :64, RANK:] == 0).all() and (b_big[:, 64:80, :RANK] == 0).all()  # off-diagonal stays zero
    assert fused.restack(layer) and getattr(layer.lora_a_stacked[0], fused.FUSED)[0] is a_big  # idempotent


@pytest.mark.parametrize(
    "idx",
    [[1] * 8, [0, 2, 2, 1, -1, 2, 3, 0], [3], [-1] * 5, [2, -1, 2]],
    ids=["one adapter", "mixed", "one token", "no adapter", "one adapter and base"],
)
def test_the_fused_forward_adds_what_vllms_per_slice_ops_add(layer, idx):
    idx = torch.tensor(idx)
    x = torch.randn(idx.shape[0], D_IN, dtype=torch.bfloat16)
    y = torch.randn(idx.shape[0], sum(OUTS), dtype=torch.bfloat16)
    expected = _per_slice(layer, y, x, idx)
    assert fused.restack(layer)
    mine = y.clone()
    fused.fused_lora_linear(mine, x, *getattr(layer.lora_a_stacked[0], fused.FUSED), idx)
    torch.testing.assert_close(mine, expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(mine[idx < 0], y[idx < 0])
    if (idx >= 0).any():
        assert (mine - y).abs().max() > 0.5  # the LoRA term is there: the comparison has power


def test_a_tokens_result_does_not_depend_on_who_shares_its_adapter(layer):
    assert fused.restack(layer)
    stacked = getattr(layer.lora_a_stacked[0], fused.FUSED)
    x, idx = torch.randn(7, D_IN, dtype=torch.bfloat16), torch.tensor([1, 1, 3, 1, 0, 3, 1])
    together = torch.zeros(7, sum(OUTS), dtype=torch.bfloat16)
    fused.fused_lora_linear(together, x, *stacked, idx)
    for t in range(7):
        alone = torch.zeros(1, sum(OUTS), dtype=torch.bfloat16)
        fused.fused_lora_linear(alone, x[t : t + 1], *stacked, idx[t : t + 1])
        assert torch.equal(alone[0], together[t]), t


def test_layers_of_another_shape_are_left_to_vllms_path(layer):
    layer.output_slices = (64, 32)  # slices that do not add up to the layer's outputs
    assert not fused.restack(layer)
    assert getattr(layer.lora_a_stacked[0], fused.FUSED, None) is None
