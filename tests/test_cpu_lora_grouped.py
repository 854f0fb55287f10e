"""The grouped CPU LoRA ops write what vLLM's own ops write (within bf16 rounding), tokens without an adapter
(index -1) get no LoRA term, and a token's result does not depend on how many tokens share its adapter."""

import pytest
import torch

from server.engine.vllm_patches import cpu_lora_grouped as grouped
from tests.lora_reference import vllm_lora_ops


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
    ops = vllm_lora_ops()
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
    ops = vllm_lora_ops()
    one = torch.tensor([2])
    mine, theirs = torch.zeros(11, 8), torch.zeros(11, 8)
    grouped.bgmv_shrink(x, a, mine, one, 1.0)
    ops.bgmv_shrink(x, a, theirs, one, 1.0)
    torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)
    assert (mine != 0).any()


def test_prefill_ops_match_vllms_and_the_plan_follows_in_place_writes(batch):
    x, a, b, _ = batch
    ops = vllm_lora_ops()
    seq_idx, seq_len = torch.tensor([2, -1, 0]), torch.tensor([4, 3, 4])  # three sequences, 11 tokens
    args = (torch.tensor([0, 4, 7]), seq_len, seq_idx, 3, 4, 11)
    mine, theirs = torch.zeros(11, 8), torch.zeros(11, 8)
    grouped.sgmv_shrink(x, a, mine, *args, 0.5)
    ops.sgmv_shrink(x.masked_fill(torch.arange(11)[:, None].ge(4) & torch.arange(11)[:, None].lt(7), 0), a, theirs,
                    *args[:2], seq_idx.clamp(min=0), *args[3:], 0.5)  # fmt: skip
    torch.testing.assert_close(mine, theirs, rtol=2e-2, atol=2e-2)
    assert (mine[4:7] == 0).all()
    out_mine, out_theirs = torch.zeros(11, 96, dtype=torch.bfloat16), torch.zeros(11, 96, dtype=torch.bfloat16)
    grouped.sgmv_expand_slice(theirs, b, out_mine, *args, 48, 48, True)
    ops.sgmv_expand_slice(theirs, b, out_theirs, *args[:2], seq_idx.clamp(min=0), *args[3:], 48, 48, True)
    assert (out_mine[4:7] == 0).all()
    keep = torch.ones(11, dtype=torch.bool)
    keep[4:7] = False
    torch.testing.assert_close(out_mine[keep], out_theirs[keep], rtol=2e-2, atol=2e-2)
    seq_idx[0] = 3  # vLLM rewrites its metadata in place each step: the cached plan must follow
    again = torch.zeros(11, 8)
    grouped.sgmv_shrink(x, a, again, *args, 0.5)
    expect = torch.zeros(11, 8)
    grouped.bgmv_shrink(x, a, expect, torch.tensor([3] * 4 + [-1] * 3 + [0] * 4), 0.5)
    assert torch.equal(again, expect) and not torch.equal(again[:4], mine[:4])


def test_batches_without_any_adapter_and_of_one_token(batch):
    x, a, _, _ = batch
    none = torch.full((11, 8), 7.0)
    grouped.bgmv_shrink(x, a, none, torch.full((11,), -1), 1.0)
    assert (none == 0).all()
    one, ref = torch.zeros(1, 8), torch.zeros(1, 8)
    grouped.bgmv_shrink(x[:1], a, one, torch.tensor([3]), 1.0)
    vllm_lora_ops().bgmv_shrink(x[:1], a, ref, torch.tensor([3]), 1.0)
    torch.testing.assert_close(one, ref, rtol=2e-2, atol=2e-2)


# --- through the real engine: the grouped ops against vLLM's own, in one mixed batch ---

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want"


def _all_patches_but_grouped() -> str:
    from server.engine import vllm_patches

    return ",".join(p for p in vllm_patches.wanted() if p != "cpu_lora_grouped")


@pytest.fixture(scope="module")
def two_paths(tmp_path_factory):
    """(grouped server, vLLM-ops server): the default settings (speculation with the shipped draft adapters),
    each also serving a random rank-4 and a rank-16 adapter without draft adapters."""
    from tests.adapters.helpers import adapter_tensors, write_adapter
    from tests.conftest import launch, upload

    folders = {}
    for r in (4, 16):
        tensors = {k: v * 20 for k, v in adapter_tensors(r, ("q_proj", "v_proj", "down_proj"), seed=r).items()}
        folders[f"random-r{r}"] = write_adapter(
            tmp_path_factory.mktemp(f"r{r}"), r, ("q_proj", "v_proj", "down_proj"), tensors=tensors
        )
    servers = []
    try:
        servers.append(launch("lora-grouped"))
        import os

        os.environ["QSERVE_VLLM_PATCHES"] = _all_patches_but_grouped()  # read by the server's vLLM processes
        try:
            servers.append(launch("lora-vllm-ops"))
        finally:
            del os.environ["QSERVE_VLLM_PATCHES"]
        for s in servers:
            for name, folder in folders.items():
                upload(s.base_url, name, folder)
        yield servers
    finally:
        for s in servers:
            s.stop()


def _mixed_batch(url: str, models: list[str]) -> list[tuple[list[str], list[float], int]]:
    """For every model at once: (tokens, logprobs, prompt tokens) of TEXT echoed and 12 greedy tokens."""
    import concurrent.futures as cf

    import httpx

    def one(model: str):
        body = {"model": model, "prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 12, "temperature": 0}
        r = httpx.post(url + "/v1/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        lp = r.json()["choices"][0]["logprobs"]
        return lp["tokens"][1:], lp["token_logprobs"][1:], r.json()["usage"]["prompt_tokens"] - 1

    with cf.ThreadPoolExecutor(len(models)) as pool:
        return list(pool.map(one, models))


@pytest.mark.engine
def test_a_mixed_batch_through_the_engine_matches_vllms_own_lora_ops(two_paths):
    from tests.conftest import ADAPTERS, MODEL

    grouped_server, vllm_server = two_paths
    models = [MODEL, *ADAPTERS, "random-r4", "random-r16"] * 2  # draft adapters: the shipped two; none: random
    ours, theirs = _mixed_batch(grouped_server.base_url, models), _mixed_batch(vllm_server.base_url, models)
    for model, (tokens, a, prompt), (their_tokens, b, _) in zip(models, ours, theirs, strict=True):
        assert tokens[:prompt] == their_tokens[:prompt], model
        same = next((i for i, (x, y) in enumerate(zip(tokens, their_tokens, strict=False)) if x != y), len(tokens))
        # the echoed prompt (teacher-forced) and the generated tokens up to a greedy near-tie flip, if any:
        # bf16 rounding moves them by hundredths, a wrong adapter by nats
        assert max(abs(x - y) for x, y in zip(a[: same + 1], b[: same + 1], strict=False)) < 0.05, model
    base = ours[0][1]
    for model, (_, a, prompt) in zip(
        models[1:5], ours[1:5], strict=True
    ):  # every adapter moves the logprobs: the check has power
        assert max(abs(x - y) for x, y in zip(a[:prompt], base[:prompt], strict=True)) > 0.1, model
