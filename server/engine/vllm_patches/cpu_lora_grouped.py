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
group the tokens by adapter slot and run one ``[n, in] @ [in, out]`` matmul per slot present in the batch
(at most ``max_loras`` of them), reading each adapter's weights in place. Tokens with index -1 (no
adapter) get no LoRA term, which also covers the wrap-around ``cpu_lora_index`` fixes. A slot with a single
token is computed as two rows: torch's one-row bf16 matmul on this CPU rounds differently from any larger
row count (``row_invariant_gemm``), and a request's output must not depend on how many tokens share its
adapter. Outputs are written exactly as vLLM's ops write theirs (padding, slices, ``add_inputs``).
"""

from __future__ import annotations

import torch

from server.engine.vllm_patches.cpu_lora_index import install_lora_op


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
    out = torch.zeros(x.shape[0], weights.shape[1], dtype=dtype, device=x.device)  # [T, out]
    if indices.shape[0] == 1:
        indices = indices.expand(x.shape[0])
    if indices.shape[0] != x.shape[0]:
        raise ValueError(f"{indices.shape[0]} LoRA indices for {x.shape[0]} tokens")
    ids = indices
    for slot in torch.unique(ids).tolist():
        if slot < 0:
            continue
        w = weights[slot].to(dtype)  # [out, in], a view unless the dtype differs
        rows = (ids == slot).nonzero().squeeze(1)  # [n]
        part = x[rows]  # [n, in]
        if part.shape[0] == 1:
            out[rows] = (part.expand(2, -1) @ w.T)[:1]
        else:
            out[rows] = part @ w.T
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


OPS = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}


def patch() -> None:
    """Install the three grouped ops (``cpu_lora_index.install_lora_op``; idempotent)."""
    for name, op in OPS.items():
        install_lora_op(name, op)
