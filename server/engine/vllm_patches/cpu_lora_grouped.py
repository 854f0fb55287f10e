"""LoRA on CPU at the cost of its arithmetic: one matmul per adapter in the batch, not a weight copy per token.

Fault (vLLM 0.32.0, CPU): ``PunicaWrapperCPU`` applies LoRA through the pure torch ops of
``vllm/lora/ops/torch_ops/lora_ops.py``. Each of ``bgmv_shrink``, ``bgmv_expand`` and ``bgmv_expand_slice``
first gathers every token's adapter weights, ``lora_weights[lora_indices_tensor]`` ([tokens, out, in], a
copy of a whole A or B matrix per token), then contracts it with ``einsum("bi, boi -> bo")``. For a rank-16
adapter on a 576-wide projection the arithmetic is under 6% of the projection's own, but the copies made
LoRA 55% of the real target's forward in a py-spy profile (one adapter, 8 requests decoding: bgmv_shrink
22%, einsum 20%, bgmv_expand_slice 12.5% self time, against 31% for the NF4 projections themselves), and
traffic over one adapter ran at 0.44x of base-only tokens/s there.

Fix (the grouped form of S-LoRA / Punica's SGMV, Chen et al. 2023 "Punica", Sheng et al. 2023 "S-LoRA"):
group the tokens by adapter slot and multiply each group by its adapter's weights in one batched matmul,
``[groups, rows, in] @ [groups, in, out]``, reading each adapter's weights once, not once per token. The
grouping (:class:`Plan`) depends only on the step's token indices, which every LoRA layer of a forward pass
shares, so it is computed once per step, not once per op call (vLLM calls these ops 14 times per decoder
layer). One group covering every token, the common case, is a plain matmul on the adapter's weights in
place. Tokens with index -1 (no adapter) get no LoRA term, which also covers the wrap-around
``cpu_lora_index`` fixes. A group is never one row: torch's one-row bf16 matmul on this CPU rounds
differently from any larger row count (``row_invariant_gemm``), and a request's output must not depend on
how many tokens share its adapter; a group is padded to at least two rows. Outputs are written exactly as
vLLM's ops write theirs (padding, slices, ``add_inputs``). The linear layers' LoRA runs one level up, a
shrink and an expand per layer for all its slices (``cpu_lora_fused``, installed by :func:`patch`); these ops
serve the output layer's LoRA (skipped while no slot has one, ``cpu_lora_logits``) and any layer that path
leaves to vLLM's wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.vllm_patches.cpu_lora_index import install_lora_op


@dataclass(frozen=True)
class Plan:
    """How a step's T tokens group by adapter slot, laid out over the slots ``first_slot`` ...
    ``first_slot + span - 1`` (the lowest to the highest slot present), M >= 2 rows per slot.

    A batched matmul over that range reads the stacked weights as a view (``weights[first_slot:][:span]``),
    because gathering just the present slots' weights copies more bytes than the matmuls then read; a slot in
    the range that no token uses costs one batch entry of zero rows. ``gather`` [span * M] the token row of each padded
    position (T: a zero row); ``rows`` [n] the tokens with an adapter and ``positions`` [n] their padded
    positions; ``whole`` the slot when one slot holds every token, else None; ``span`` 0 when no token has one.
    """

    gather: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    rows_per_group: int
    first_slot: int
    span: int
    whole: int | None


def make_plan(indices: torch.Tensor) -> Plan:
    """The :class:`Plan` of per-token slot ``indices`` [T] (-1: no adapter)."""
    tokens = indices.shape[0]
    sorted_slots, order = torch.sort(indices, stable=True)
    slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
    skip = int(slots[0] < 0) if tokens else 0  # sorted ascending: the -1 group, if any, comes first
    slots, counts = slots[skip:], counts[skip:]
    groups = slots.shape[0]
    if groups == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return Plan(empty, empty, empty, 2, 0, 0, None)
    rows_per_group = max(2, int(counts.max()))
    first_slot, span = int(slots[0]), int(slots[-1] - slots[0]) + 1
    starts = torch.cumsum(counts, 0) - counts  # each group's first sorted position, after the -1 group
    first = tokens - int(counts.sum())
    group_of = torch.repeat_interleave(torch.arange(groups), counts)  # [n]
    rank = torch.arange(tokens - first) - starts[group_of]  # position within its group
    rows, positions = order[first:], (slots[group_of] - first_slot) * rows_per_group + rank
    gather = torch.full((span * rows_per_group,), tokens, dtype=torch.long)
    gather[positions] = rows
    whole = int(slots[0]) if groups == 1 and first == 0 else None
    return Plan(gather, rows, positions, rows_per_group, first_slot, span, whole)


def padded_rows(x: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Rows ``x`` [T, in] laid out by ``plan``: [span, M, in], zeros where no token sits."""
    return torch.cat([x, x.new_zeros(1, x.shape[1])])[plan.gather].view(plan.span, plan.rows_per_group, -1)


_plans: dict[tuple, Plan] = {}  # token indices (their values) -> plan
_prefill: dict[tuple, tuple[torch.Tensor, Plan]] = {}  # (sequence indices, lengths) -> per-token indices, plan
_prefill_plans: dict[int, Plan] = {}  # id of a per-token index tensor held in _prefill -> its plan


def _bounded(cache: dict) -> dict:
    """``cache``, emptied first when it holds 16 entries (a step needs a few: the target's and the draft's
    token and sampler indices)."""
    if len(cache) >= 16:
        cache.clear()
        if cache is _prefill:
            _prefill_plans.clear()
    return cache


def plan_of(indices: torch.Tensor) -> Plan:
    """:func:`make_plan` of ``indices``, once per step: every LoRA layer of a forward pass gets the same indices.

    Keyed by the values, not the tensor: vLLM rewrites its index buffers in place each step, and its
    inference tensors carry no version counter to tell."""
    plan = _prefill_plans.get(id(indices))
    if plan is not None:
        return plan
    key = tuple(indices.tolist())
    plan = _plans.get(key)
    if plan is None:
        plan = _bounded(_plans)[key] = make_plan(indices)
    return plan


def exploded(lora_indices_tensor: torch.Tensor, seq_len_tensor: torch.Tensor) -> torch.Tensor:
    """Per-token indices of a prefill step (each sequence's index repeated over its tokens), as vLLM's ``sgmv_*``
    compute them, once per step; the tensor is ours and never written, so :func:`plan_of` finds its plan by
    identity (the cache holds it, so its id is not reused while the entry lives)."""
    key = (tuple(lora_indices_tensor.tolist()), tuple(seq_len_tensor.tolist()))
    hit = _prefill.get(key)
    if hit is None:
        tokens = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
        hit = _bounded(_prefill)[key] = (tokens, make_plan(tokens))
        _prefill_plans[id(tokens)] = hit[1]
    return hit[0]


def grouped_lora(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype):
    """Per token ``t``: ``inputs[t] @ weights[indices[t]].T``, 0 where ``indices[t] < 0``.

    Shapes: ``inputs`` [T, in], ``weights`` [slots, out, in] or [slots, 1, out, in], ``indices`` [T].
    Returns [T, out] in ``dtype``. One index for T > 1 tokens applies to all of them, as vLLM's ``einsum``
    broadcasts it: its prompt-logprobs path computes one request's prompt logits with the batch's per-request
    ``sampler_indices``. Raises ValueError for any other count (vLLM's own ops fail there too, in ``einsum``).
    """
    if weights.dim() == 4:
        weights = weights.squeeze(1)  # [slots, out, in]
    x = inputs.to(dtype)  # [T, in]
    tokens = x.shape[0]
    if indices.shape[0] == 1 and tokens > 1:
        indices = indices.expand(tokens)
    if indices.shape[0] != tokens:
        raise ValueError(f"{indices.shape[0]} LoRA indices for {tokens} tokens")
    plan = plan_of(indices)
    if plan.whole is not None:  # every token on one adapter: its weights in place
        w = weights[plan.whole].to(dtype)  # [out, in]
        return x @ w.T if tokens > 1 else (x.expand(2, -1) @ w.T)[:1]
    out = torch.zeros(tokens, weights.shape[1], dtype=dtype)  # [T, out]
    if plan.span == 0:
        return out
    w = weights[plan.first_slot : plan.first_slot + plan.span].to(dtype)  # [span, out, in], a view
    y = torch.bmm(padded_rows(x, plan), w.transpose(1, 2))  # [span, M, out]
    out[plan.rows] = y.reshape(-1, y.shape[-1])[plan.positions]
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    """vLLM's ``bgmv_shrink`` (same arguments and writes), grouped: :func:`grouped_lora`."""
    outputs = grouped_lora(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    """vLLM's ``bgmv_expand`` (same arguments and writes), grouped: :func:`grouped_lora`."""
    outputs = grouped_lora(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])  # adapter and model may pad differently
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int,
    add_inputs: bool = True,
):  # fmt: skip
    """vLLM's ``bgmv_expand_slice`` (same arguments and writes), grouped: :func:`grouped_lora`."""
    outputs = grouped_lora(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def sgmv_shrink(
    inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches,
    max_seq_length, token_nums, scaling,
):  # fmt: skip
    """vLLM's ``sgmv_shrink`` (same arguments and writes): :func:`bgmv_shrink` over :func:`exploded` indices."""
    bgmv_shrink(inputs, lora_a_weights, output_tensor, exploded(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches,
    max_seq_length, token_nums, add_inputs: bool = False,
):  # fmt: skip
    """vLLM's ``sgmv_expand`` (same arguments and writes): :func:`bgmv_expand` over :func:`exploded` indices."""
    bgmv_expand(inputs, lora_b_weights, output_tensor, exploded(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor, batches,
    max_seq_length, token_nums, slice_offset: int, slice_size: int, add_inputs: bool = False,
):  # fmt: skip
    """vLLM's ``sgmv_expand_slice`` (same arguments and writes): :func:`bgmv_expand_slice` over :func:`exploded`."""
    indices = exploded(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


OPS = {
    "bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink, "sgmv_expand": sgmv_expand, "sgmv_expand_slice": sgmv_expand_slice,
}  # fmt: skip


def patch() -> None:
    """Install the six grouped ops (``cpu_lora_index.install_lora_op``), the fused linear layers
    (``cpu_lora_fused``) and the output layer's skip (``cpu_lora_logits``), idempotently."""
    from server.engine.vllm_patches import cpu_lora_fused, cpu_lora_logits

    for name, op in OPS.items():
        install_lora_op(name, op)
    cpu_lora_fused.patch()
    cpu_lora_logits.patch()
