"""The grouped CPU LoRA ops write what vLLM's own ops write (within bf16 rounding), tokens without an adapter
(index -1) get no LoRA term, and a token's result does not depend on how many tokens share its adapter."""

import importlib.util

import pytest
import torch

from server.engine.vllm_patches import cpu_lora_grouped as grouped


def _vllm_ops():
    """vLLM's own op module, loaded fresh from its file (the patches may have replaced the live one's functions)."""
    spec = importlib.util.find_spec("vllm.lora.ops.torch_ops.lora_ops")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def batch():
    torch.manual_seed(0)
    slots, d_in, rank, d_out, tokens = 4, 64, 8, 48, 11
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16)
    a = torch.randn(slots, 1, rank, d_in, dtype=torch.bfloat16) / 8  # [slots, 1, r, in]: vLLM's stacked A
    b = torch.randn(slots, 1, d_out, rank, dtype=torch.bfloat16) / 4  # [slots, 1, out, r]
    idx = torch.tensor([0, 2, 2, 1, 0, 2, 3, 0, 1, 2, 2])  # every slot, uneven groups, one single-token slot
    return x, a, b, idx


def test_shrink_and_expand_match_vllms_ops(batch):
    x, a, b, idx = batch
    ops = _vllm_ops()
    mine, theirs = torch.zeros(11, 8), torch.zeros(11, 8)
    grouped.bgmv_shrink(x, a, mine, idx, 0.5)
    ops.bgmv_shrink(x, a, theirs, idx, 0.5)
    torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)
    out_mine, out_theirs = torch.ones(11, 48, dtype=torch.bfloat16), torch.ones(11, 48, dtype=torch.bfloat16)
    grouped.bgmv_expand(theirs, b, out_mine, idx, add_inputs=True)
    ops.bgmv_expand(theirs, b, out_theirs, idx, add_inputs=True)
    torch.testing.assert_close(out_mine, out_theirs, rtol=2e-2, atol=2e-2)
    wide_mine, wide_theirs = torch.zeros(11, 96, dtype=torch.bfloat16), torch.zeros(11, 96, dtype=torch.bfloat16)
    grouped.bgmv_expand_slice(theirs, b, wide_mine, idx, 48, 48, add_inputs=False)
    ops.bgmv_expand_slice(theirs, b, wide_theirs, idx, 48, 48, add_inputs=False)
    torch.testing.assert_close(wide_mine, wide_theirs, rtol=2e-2, atol=2e-2)
    assert (wide_mine[:, :48] == 0).all()


def test_tokens_without_an_adapter_get_no_lora_term(batch):
    x, a, _, idx = batch
    idx = idx.clone()
    idx[[1, 4]] = -1  # vLLM's own op would take the last slot's weights here
    out = torch.full((11, 8), 7.0)
    grouped.bgmv_shrink(x, a, out, idx, 1.0)
    assert (out[[1, 4]] == 0).all() and (out[[0, 2]] != 0).any()


def test_a_tokens_result_does_not_depend_on_who_shares_its_adapter(batch):
    x, a, _, idx = batch
    together = torch.zeros(11, 8)
    grouped.bgmv_shrink(x, a, together, idx, 1.0)
    for t in range(11):  # each token alone: a group of one row
        alone = torch.zeros(1, 8)
        grouped.bgmv_shrink(x[t : t + 1], a, alone, idx[t : t + 1], 1.0)
        assert torch.equal(alone[0], together[t]), t


def test_indices_must_be_one_per_token(batch):
    x, a, _, idx = batch
    with pytest.raises(ValueError, match="10 LoRA indices for 11 tokens"):
        grouped.bgmv_shrink(x, a, torch.zeros(11, 8), idx[:10], 1.0)


def test_one_index_applies_to_every_token_as_in_vllms_prompt_logprobs_path(batch):
    """vLLM computes one request's prompt logprobs with its one ``sampler_indices`` entry for all prompt rows."""
    x, a, _, _ = batch
    ops = _vllm_ops()
    one = torch.tensor([2])
    mine, theirs = torch.zeros(11, 8), torch.zeros(11, 8)
    grouped.bgmv_shrink(x, a, mine, one, 1.0)
    ops.bgmv_shrink(x, a, theirs, one, 1.0)
    torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)
    assert (mine != 0).any()
