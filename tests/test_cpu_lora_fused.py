"""A restacked LoRA layer holds what vLLM wrote into its slices, and its two-matmul forward adds what vLLM's
per-slice shrink and expand ops add (through the real engine: tests/test_cpu_lora_grouped.py)."""

from types import SimpleNamespace

import pytest
import torch

from server.engine.vllm_patches import cpu_lora_fused as fused
from server.engine.vllm_patches import cpu_lora_kernel
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
    stacked = getattr(layer.lora_a_stacked[0], fused.FUSED)
    a_big, b_big = stacked.a, stacked.b
    assert a_big.shape == (SLOTS, 3 * RANK, D_IN) and b_big.shape == (SLOTS, sum(OUTS), 3 * RANK)
    assert stacked.offsets == [0, 64, 80, 96] and (stacked.ranks == RANK).all()
    layer.lora_b_stacked[1][2] = 0  # vLLM's reset_lora
    assert (b_big[2, 64:80, RANK : 2 * RANK] == 0).all() and (b_big[2, :64, :RANK] != 0).any()
    for t in (*layer.lora_a_stacked, *layer.lora_b_stacked):  # vLLM's set_lora, a rank-4 adapter of q and v
        t[3] = 0
    layer.lora_a_stacked[2][3, 0, :4].copy_(torch.ones(4, D_IN))
    layer.lora_b_stacked[0][3, 0, :, :3].copy_(torch.ones(64, 3))
    assert (a_big[3, 2 * RANK : 2 * RANK + 4] == 1).all()
    assert (b_big[:, :64, RANK:] == 0).all() and (b_big[:, 64:80, :RANK] == 0).all()  # off-diagonal stays zero
    fused.refresh(stacked, 3)
    assert stacked.ranks[3].tolist() == [3, 0, 4] and stacked.ranks[2].tolist() == [RANK] * 3
    assert fused.restack(layer) and getattr(layer.lora_a_stacked[0], fused.FUSED).a is a_big  # idempotent


def _run(layer, path: str, y: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> None:
    """``fused_lora_linear`` on the restacked ``layer``: with its slices' offsets (the kernel) or without."""
    stacked = getattr(layer.lora_a_stacked[0], fused.FUSED)
    fused.fused_lora_linear(y, x, stacked.a, stacked.b, idx, stacked if path == "kernel" else None)


def _needs_kernel(path: str) -> None:
    """The kernel must build wherever the CPU can run it; elsewhere its tests skip, saying why."""
    if path == "kernel":
        missing = [f for f in cpu_lora_kernel.NEEDED_FLAGS if f not in cpu_lora_kernel.cpu_flags()]
        if missing:
            pytest.skip(f"this CPU lacks {missing}")
        assert cpu_lora_kernel.kernel() is not None, "the CPU LoRA kernel did not build (see the log)"


PATHS = ("matmuls", "kernel")
PREFILL = [1] * 30 + [3, 0, -1] + [1] * 20 + [3] * 7  # 60 tokens of uneven groups: past the kernel's sizes


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "idx",
    [[1] * 8, [0, 2, 2, 1, -1, 2, 3, 0], [3], [-1] * 5, [2, -1, 2], [1, 1, 1, 1, 1, 2, 1, 1, 0], PREFILL],
    ids=[
        "one adapter",
        "mixed",
        "one token",
        "no adapter",
        "one adapter and base",
        "more than a block",
        "a prefill of uneven groups",
    ],
)
def test_the_fused_forward_adds_what_vllms_per_slice_ops_add(layer, idx, path):
    _needs_kernel(path)
    idx = torch.tensor(idx)
    x = torch.randn(idx.shape[0], D_IN, dtype=torch.bfloat16)
    y = torch.randn(idx.shape[0], sum(OUTS), dtype=torch.bfloat16)
    expected = _per_slice(layer, y, x, idx)
    assert fused.restack(layer)
    mine = y.clone()
    _run(layer, path, mine, x, idx)
    torch.testing.assert_close(mine, expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(mine[idx < 0], y[idx < 0])
    if (idx >= 0).any():
        assert (mine - y).abs().max() > 0.5  # the LoRA term is there: the comparison has power


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("idx", [[1, 1, 3, 1, 0, 3, 1], PREFILL], ids=["a decode step", "a prefill"])
def test_a_tokens_result_does_not_depend_on_who_shares_its_adapter(layer, path, idx):
    _needs_kernel(path)
    assert fused.restack(layer)
    idx = torch.tensor(idx)
    x = torch.randn(idx.shape[0], D_IN, dtype=torch.bfloat16)
    together = torch.zeros(idx.shape[0], sum(OUTS), dtype=torch.bfloat16)
    _run(layer, path, together, x, idx)
    for t in range(idx.shape[0]):
        alone = torch.zeros(1, sum(OUTS), dtype=torch.bfloat16)
        _run(layer, path, alone, x[t : t + 1], idx[t : t + 1])
        assert torch.equal(alone[0], together[t]), t


def test_layers_of_another_shape_are_left_to_vllms_path(layer):
    layer.output_slices = (64, 32)  # slices that do not add up to the layer's outputs
    assert not fused.restack(layer)
    assert getattr(layer.lora_a_stacked[0], fused.FUSED, None) is None


def test_the_kernel_serves_decode_sizes_and_prefill_keeps_the_matmuls(layer, monkeypatch):
    assert fused.restack(layer)
    calls = []
    monkeypatch.setattr(fused, "kernel", lambda: SimpleNamespace(fused_lora=lambda y, *rest: calls.append(y.shape[0])))
    for tokens in (1, cpu_lora_kernel.MAX_TOKENS, cpu_lora_kernel.MAX_TOKENS + 1):
        x, y = torch.randn(tokens, D_IN, dtype=torch.bfloat16), torch.zeros(tokens, sum(OUTS), dtype=torch.bfloat16)
        _run(layer, "kernel", y, x, torch.ones(tokens, dtype=torch.long))
        assert (y != 0).any() == (tokens > cpu_lora_kernel.MAX_TOKENS)  # the fake kernel adds nothing
    assert calls == [1, cpu_lora_kernel.MAX_TOKENS]


@pytest.mark.parametrize(
    "wanted, on", [(["cpu_lora_grouped"], True), (["cpu_lora_grouped", "row_invariant_gemm"], False)]
)
def test_the_kernel_is_off_when_batch_invariance_is_asked_for(monkeypatch, wanted, on):
    from server.engine import vllm_patches

    monkeypatch.setattr(vllm_patches, "wanted", lambda: wanted)
    monkeypatch.setitem(fused._use_kernel, "on", not on)
    fused.patch()
    assert fused._use_kernel["on"] is on


def test_the_kernel_refuses_an_adapter_index_past_its_slots(layer):
    _needs_kernel("kernel")
    assert fused.restack(layer)
    st = getattr(layer.lora_a_stacked[0], fused.FUSED)
    x, y = torch.randn(2, D_IN, dtype=torch.bfloat16), torch.zeros(2, sum(OUTS), dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="adapter index out of range"):
        cpu_lora_kernel.kernel().fused_lora(y, x, st.a, st.bt, torch.tensor([0, SLOTS]), st.offsets, st.ranks)


def test_the_kernel_reads_only_each_slots_rank_and_adds_what_vllm_adds(layer):
    _needs_kernel("kernel")
    for a, b in zip(layer.lora_a_stacked, layer.lora_b_stacked, strict=True):  # rank-4 and rank-2 adapters
        a[:2, :, 4:], b[:2, :, :, 4:], a[2:, :, 2:], b[2:, :, :, 2:] = 0, 0, 0, 0
    idx = torch.tensor([0, 3, 3, 1, -1, 2, 0])
    x, y = torch.randn(7, D_IN, dtype=torch.bfloat16), torch.randn(7, sum(OUTS), dtype=torch.bfloat16)
    expected = _per_slice(layer, y, x, idx)
    assert fused.restack(layer)
    assert getattr(layer.lora_a_stacked[0], fused.FUSED).ranks.tolist() == [[4] * 3] * 2 + [[2] * 3] * 2
    mine = y.clone()
    _run(layer, "kernel", mine, x, idx)
    torch.testing.assert_close(mine, expected, rtol=1e-2, atol=1e-2)
    assert (mine - y)[idx >= 0].abs().max() > 0.1
