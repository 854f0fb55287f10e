"""No output-layer LoRA work when no resident adapter has an output-layer (``lm_head``) LoRA.

Cost (vLLM 0.32.0, CPU): with LoRA enabled, ``LogitsProcessorWithLoRA`` adds its LoRA term to the logits at
every step, ``PunicaWrapperCPU.add_lora_logits``: a shrink and an expand over the whole vocabulary (49,152
columns for SmolLM2) for the batch's rows, though adapters that target only the projections (ours, and most)
leave every slot of that layer zero. Measured in-process on the bf16 draft at concurrency 1: 0.36-0.42 ms per
token with no adapter and 0.92 ms with one, against ~11 ms for the whole draft step.

Fix: the layer's stacked A carries the set of slots that hold an output-layer LoRA, kept by the layer's own
``set_lora`` (vLLM calls it only for an adapter with weights for that module) and ``reset_lora``; while that
set is empty, ``add_lora_logits`` adds nothing (the term is exactly zero) and returns at once. Any slot with
one and the computation runs as vLLM's, for the whole batch. (Our server refuses adapters on ``lm_head``,
``server/adapters/validate.py``, so there the term is always skipped.)
"""

from __future__ import annotations

import functools

LIVE = "_qserve_live_slots"  # attribute of a logits layer's lora_a_stacked: slots with an lm_head LoRA


def _create_lora_weights(create_lora_weights):
    @functools.wraps(create_lora_weights)
    def wrapper(self, max_loras, lora_config, model_config=None):
        create_lora_weights(self, max_loras, lora_config, model_config)
        setattr(self.lora_a_stacked, LIVE, set())

    wrapper._qserve_patched = True
    return wrapper


def _tracking(method, change: str):
    """Wrap the layer's ``set_lora`` (``change`` "add") or ``reset_lora`` ("discard") so its live slots follow."""

    @functools.wraps(method)
    def wrapper(self, index, *args):
        method(self, index, *args)
        live = getattr(self.lora_a_stacked, LIVE, None)
        if live is not None:
            getattr(live, change)(index)

    wrapper._qserve_patched = True
    return wrapper


def _skip_without_live_slots(add_lora_logits):
    @functools.wraps(add_lora_logits)
    def wrapper(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        if getattr(lora_a_stacked, LIVE, None) == set():
            return None
        return add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)

    wrapper._qserve_patched = True
    wrapper._qserve_logits_skip = True  # copied by any later functools.wraps over it: idempotent under them
    return wrapper


def patch() -> None:
    """Track the live slots of ``LogitsProcessorWithLoRA`` and skip ``PunicaWrapperCPU.add_lora_logits`` while
    there are none (idempotent)."""
    from vllm.lora.layers.logits_processor import LogitsProcessorWithLoRA
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    for owner, name, wrap in (
        (LogitsProcessorWithLoRA, "create_lora_weights", _create_lora_weights),
        (LogitsProcessorWithLoRA, "set_lora", lambda fn: _tracking(fn, "add")),
        (LogitsProcessorWithLoRA, "reset_lora", lambda fn: _tracking(fn, "discard")),
        (PunicaWrapperCPU, "add_lora_logits", _skip_without_live_slots),
    ):
        fn = getattr(owner, name)
        marker = "_qserve_logits_skip" if name == "add_lora_logits" else "_qserve_patched"
        if not getattr(fn, marker, False):
            setattr(owner, name, wrap(fn))
