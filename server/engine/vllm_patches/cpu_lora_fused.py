"""A LoRA linear layer on CPU in two matmuls, whatever its slices: one shrink and one expand per layer, not per slice.

Cost (vLLM 0.32.0, CPU): ``PunicaWrapperCPU.add_lora_linear`` runs one shrink and one expand op per slice of
the layer (q, k, v; gate, up), with a float32 buffer per slice in between: 14 op calls per decoder layer of
a Llama-shaped model, 423 per decode step of SmolLM2-135M. Each call costs 57-85 us on this 2-core CPU
(torch dispatch, the grouping, the output writes), while the step's whole LoRA arithmetic is about 4 ms:
traffic over one adapter ran at 0.67x of base-only tokens/s at concurrency 8 with the grouped ops
(``cpu_lora_grouped``; BENCHMARKS.md, "CPU LoRA path").

Fix: each linear LoRA layer keeps its slices' weights as views of two tensors per layer, made when vLLM
creates them (``create_lora_weights``): A of every slice stacked along the rank, ``a_big`` [slots,
slices * rank, in], and B block-diagonal, ``b_big`` [slots, out_total, slices * rank] (slice s's B at rows
of its output columns and columns of its rank block; zeros elsewhere, never written). vLLM's ``set_lora``
and ``reset_lora`` write through the views, so the stacked tensors always hold the resident adapters and
nothing is copied per step. ``add_lora_linear`` is then ``y += (x @ A.T) @ B.T`` for one adapter on every
token, or two batched matmuls over the adapter groups of :func:`cpu_lora_grouped.plan_of` for several:
the same sum as vLLM's per-slice ops (the zero blocks add exact zeros), rounded to the layer's dtype
between the two products as vLLM's expand rounds its float32 buffer. Groups are at least two rows, as in
``cpu_lora_grouped`` (the one-row bf16 matmul rounds differently). A bf16 call over at most 32 tokens runs
the same sum in the compiled kernel of ``cpu_lora_kernel`` instead (per-call library overhead dominated
those matmuls), unless ``--batch-invariant`` asks for one path at every size; for it each layer also keeps
its slots' ranks and B transposed, refreshed whenever vLLM writes a slot. A layer whose weights do not have this
shape, a call with a buffer or a scale other than 1, or indices that do not match the rows go through vLLM's
own ``add_lora_linear`` (and the grouped ops).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from server.engine.vllm_patches.cpu_lora_grouped import padded_rows, plan_of
from server.engine.vllm_patches.cpu_lora_kernel import MAX_TOKENS, kernel

FUSED = "_qserve_fused"  # attribute of a layer's first A view: its Stacked
_use_kernel = {"on": False}  # patch() turns the decode-size kernel on unless batch invariance is asked for


@dataclass(frozen=True)
class Stacked:
    """A restacked layer's LoRA weights: ``a`` [slots, S * r, in], block-diagonal ``b`` [slots, out_total, S * r],
    ``offsets`` the slices' first output rows and ``out_total`` (S + 1); for the kernel, kept by :func:`refresh`
    as vLLM writes a slot: ``ranks`` [slots, S] int64 (the rows of each slice's rank block that can be nonzero)
    and ``bt`` [slots, r, out_total], each slice's B block transposed (its expand reads rows, not columns)."""

    a: torch.Tensor
    b: torch.Tensor
    offsets: list[int]
    ranks: torch.Tensor
    bt: torch.Tensor


def refresh(stacked: Stacked, index: int) -> None:
    """Recompute slot ``index``'s ``ranks`` (per slice, one past the last rank row whose A row or B column is
    nonzero) and ``bt`` from its A and B."""
    rank = stacked.bt.shape[1]
    for s, (start, stop) in enumerate(zip(stacked.offsets[:-1], stacked.offsets[1:], strict=True)):
        block = slice(s * rank, (s + 1) * rank)
        b_block = stacked.b[index, start:stop, block]  # [out_s, rank]
        used = (stacked.a[index, block] != 0).any(1) | (b_block != 0).any(0)  # [rank]
        stacked.ranks[index, s] = int(used.nonzero().max()) + 1 if used.any() else 0
        stacked.bt[index, :, start:stop] = b_block.T


def restack(layer) -> bool:
    """Make ``layer``'s ``lora_a_stacked`` / ``lora_b_stacked`` (tuples of [slots, 1, rank, in] and
    [slots, 1, out_s, rank], one per slice) views of one ``a_big`` and one block-diagonal ``b_big``, their
    values kept. Returns False (the layer left as it is) when the slices are not of that shape, or when they
    do not add up to the layer's ``output_slices``."""
    a, b = layer.lora_a_stacked, layer.lora_b_stacked
    if getattr(a[0], FUSED, None) is not None:
        return True
    if len(a) != len(b) or any(t.dim() != 4 or t.shape[1] != 1 or t.device.type != "cpu" for t in (*a, *b)):
        return False
    slots, _, rank, d_in = a[0].shape
    outs = [t.shape[2] for t in b]
    if any(t.shape != a[0].shape for t in a) or any(t.shape[3] != rank or t.shape[0] != slots for t in b):
        return False
    if tuple(outs) != tuple(getattr(layer, "output_slices", ())) or len({t.dtype for t in (*a, *b)}) != 1:
        return False
    a_big = torch.zeros(slots, len(a) * rank, d_in, dtype=a[0].dtype)
    b_big = torch.zeros(slots, sum(outs), len(a) * rank, dtype=a[0].dtype)
    a_views, b_views, offset = [], [], 0
    for s, (a_s, b_s) in enumerate(zip(a, b, strict=True)):
        a_views.append(a_big[:, None, s * rank : (s + 1) * rank, :])
        b_views.append(b_big[:, None, offset : offset + outs[s], s * rank : (s + 1) * rank])
        a_views[-1].copy_(a_s)
        b_views[-1].copy_(b_s)
        offset += outs[s]
    offsets = [int(o) for o in torch.tensor([0, *outs]).cumsum(0)]
    bt = torch.zeros(slots, rank, sum(outs), dtype=a[0].dtype)
    stacked = Stacked(a_big, b_big, offsets, torch.zeros(slots, len(a), dtype=torch.long), bt)
    for index in range(slots):
        refresh(stacked, index)
    setattr(a_views[0], FUSED, stacked)
    layer.lora_a_stacked, layer.lora_b_stacked = tuple(a_views), tuple(b_views)
    return True


def fused_lora_linear(y: torch.Tensor, x: torch.Tensor, a_big: torch.Tensor, b_big: torch.Tensor,
                      indices: torch.Tensor, stacked: Stacked | None = None) -> None:  # fmt: skip
    """Per token ``t`` with ``s = indices[t] >= 0``: ``y[t] += (x[t] @ a_big[s].T) @ b_big[s].T``, in place.

    Shapes: ``y`` [T, out_total], ``x`` [T, in], ``a_big`` [slots, R, in], ``b_big`` [slots, out_total, R],
    ``indices`` [T] (-1: no adapter, no term). All of one dtype. Given the layer's ``stacked`` (its slices and
    ranks), a bf16 call over at most ``cpu_lora_kernel.MAX_TOKENS`` tokens runs the compiled kernel where it
    could be built."""
    tokens = x.shape[0]
    if stacked is not None and tokens <= MAX_TOKENS and _kernel_fits(y, x):
        module = kernel()
        if module is not None:
            module.fused_lora(y, x, a_big, stacked.bt, indices.long().contiguous(), stacked.offsets, stacked.ranks)
            return
    plan = plan_of(indices)
    if plan.whole is not None:  # every token on one adapter: its weights in place
        rows = x if tokens > 1 else x.expand(2, -1)
        y += ((rows @ a_big[plan.whole].T) @ b_big[plan.whole].T)[:tokens]
        return
    if plan.span == 0:
        return
    present = slice(plan.first_slot, plan.first_slot + plan.span)  # views: no weights copied
    h = torch.bmm(padded_rows(x, plan), a_big[present].transpose(1, 2))  # [span, M, R]
    d = torch.bmm(h, b_big[present].transpose(1, 2)).view(-1, y.shape[1])  # [span * M, out_total]
    y.index_add_(0, plan.rows, d[plan.positions])


def _kernel_fits(y: torch.Tensor, x: torch.Tensor) -> bool:
    """The kernel's layout: bf16 throughout, rows of ``x`` and ``y`` contiguous."""
    return x.dtype == torch.bfloat16 and x.stride(-1) == 1 and y.stride(-1) == 1


def _fused_add_lora_linear(add_lora_linear):
    @functools.wraps(add_lora_linear)
    def wrapper(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        fused = getattr(lora_a_stacked[0], FUSED, None)
        if fused is not None and buffer is None and scale == 1.0:
            x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
            indices = self.token_lora_indices
            if (indices.shape[0] == x2.shape[0] == y2.shape[0] and y2.shape[1] == fused.b.shape[1]
                    and x.dtype == y.dtype == fused.a.dtype):  # fmt: skip
                fused_lora_linear(y2, x2, fused.a, fused.b, indices, fused if _use_kernel["on"] else None)
                return None
        return add_lora_linear(
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs
        )

    wrapper._qserve_patched = True
    return wrapper


def _ranks_kept(write):
    """Wrap a layer's ``set_lora`` / ``reset_lora`` (``write(self, index, ...)``) to :func:`refresh` that slot."""

    @functools.wraps(write)
    def wrapper(self, index, *args, **kwargs):
        result = write(self, index, *args, **kwargs)
        stacked = getattr(self.lora_a_stacked[0], FUSED, None)
        if stacked is not None:
            refresh(stacked, index)
        return result

    wrapper._qserve_patched = True
    return wrapper


def _restacked(create_lora_weights):
    @functools.wraps(create_lora_weights)
    def wrapper(self, max_loras, lora_config, model_config=None):
        create_lora_weights(self, max_loras, lora_config, model_config)
        restack(self)

    wrapper._qserve_patched = True
    return wrapper


def patch() -> None:
    """Restack every linear LoRA layer's weights as vLLM creates them, and route ``PunicaWrapperCPU.add_lora_linear``
    through :func:`fused_lora_linear` for restacked layers (idempotent); its decode-size kernel is on unless
    ``row_invariant_gemm`` is wanted (``--batch-invariant``: one path for every batch size).

    Raises:
        RuntimeError: vLLM's linear LoRA layers lost the ``create_lora_weights``, ``set_lora`` or ``reset_lora``
            this relies on.
    """
    from vllm.lora import layers
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA as base
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from server.engine import vllm_patches

    _use_kernel["on"] = "row_invariant_gemm" not in vllm_patches.wanted()
    linear = {base} | {c for c in vars(layers).values() if isinstance(c, type) and issubclass(c, base)}
    owners = [c for c in linear if "create_lora_weights" in vars(c)]
    if any(name not in vars(base) for name in ("create_lora_weights", "set_lora", "reset_lora")):
        raise RuntimeError("vllm.lora.layers.base_linear.BaseLinearLayerWithLoRA lost create_lora_weights, "
                           "set_lora or reset_lora")  # fmt: skip
    for owner in owners:
        if not getattr(owner.create_lora_weights, "_qserve_patched", False):
            owner.create_lora_weights = _restacked(owner.create_lora_weights)
    for owner in linear:
        for name in ("set_lora", "reset_lora"):
            if name in vars(owner) and not getattr(vars(owner)[name], "_qserve_patched", False):
                setattr(owner, name, _ranks_kept(vars(owner)[name]))
    if not getattr(PunicaWrapperCPU.add_lora_linear, "_qserve_patched", False):
        PunicaWrapperCPU.add_lora_linear = _fused_add_lora_linear(PunicaWrapperCPU.add_lora_linear)
