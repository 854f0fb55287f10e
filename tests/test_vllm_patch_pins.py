"""Pins on what our start-up patches assume of vLLM's source: a change upstream fails here, not in a user's engine.

Two kinds of assumption. A patch that *replaces* a vLLM function with our own version of it (a copy with a
fix) must be re-read against the new upstream text when vLLM changes it: :data:`COPIES` pins the source of
each replaced function by hash. A wrapper that restates a vLLM method's parameters (to read or pass them by
name or position) breaks silently if upstream renames or reorders them: every wrapper the patches install is
checked against the signature of what it wraps (a wrapper shared by several ops names what it reads in
``_qserve_reads``; those parameters must sit where it reads them).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import json
import os
import subprocess
import sys

import pytest

from server.engine import vllm_patches

# (vLLM module, qualified name) -> (sha256[:16] of its source in vLLM WRITTEN_FOR, what of ours copies it)
COPIES = {
    ("vllm.v1.spec_decode.llm_base_proposer", "compute_probs_and_sample_next_token"): (
        "53e06046092d90c1", "vllm_patches.seeded_drafts.compute_probs_and_sample_next_token"),
    ("vllm.v1.sample.rejection_sampler", "apply_sampling_constraints"): (
        "de480799c7838273", "vllm_patches.spec_logits.apply_sampling_constraints"),
    ("vllm.utils.cpu_triton_utils", "_expand_kernel_impl"): (
        "cb72d4d389c5be6d", "vllm_patches.cpu_kernels.expand_to_tokens (same contract)"),
    ("vllm.v1.sample.logits_processor", "build_logitsprocs"): (
        "ae2fd0fa02d5d544", "vllm_patches.spec_logits.build_logitsprocs (builds the built-ins itself)"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_shrink"): (
        "fb161e1078a57c05", "vllm_patches.cpu_lora_grouped.bgmv_shrink (how it writes its output)"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand"): (
        "33cb1ccf3017412b", "vllm_patches.cpu_lora_grouped.bgmv_expand (how it writes its output)"),
    ("vllm.lora.ops.torch_ops.lora_ops", "bgmv_expand_slice"): (
        "ce2c6116decf36fa", "vllm_patches.cpu_lora_grouped.bgmv_expand_slice (how it writes its output)"),
    ("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_lora_logits"): (
        "d648b9d36a149492", "vllm_patches.prompt_logprobs_lora._per_token_indices (its body, with per-token indices)"),
    ("vllm.lora.ops.torch_ops.lora_ops", "sgmv_shrink"): (
        "75df9a1cb158f9e4", "vllm_patches.cpu_lora_grouped.sgmv_shrink (its arguments)"),
    ("vllm.lora.ops.torch_ops.lora_ops", "sgmv_expand"): (
        "e89b0fdc03bba751", "vllm_patches.cpu_lora_grouped.sgmv_expand (its arguments)"),
    ("vllm.lora.ops.torch_ops.lora_ops", "sgmv_expand_slice"): (
        "d5020834c67a0134", "vllm_patches.cpu_lora_grouped.sgmv_expand_slice (its arguments)"),
    ("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_lora_linear"): (
        "66b6b1349d74b67a", "vllm_patches.cpu_lora_fused.fused_lora_linear (its sum, in two matmuls)"),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.create_lora_weights"): (
        "b7c015e18fe58d29", "vllm_patches.cpu_lora_fused.restack (the slices' shapes it stacks)"),
    ("vllm.lora.layers.column_parallel_linear", "MergedColumnParallelLinearWithLoRA.create_lora_weights"): (
        "d5c17a67078e91ad", "vllm_patches.cpu_lora_fused.restack (the slices' shapes it stacks)"),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.reset_lora"): (
        "c62b8114c96992ad", "vllm_patches.cpu_lora_fused.restack, refresh (writes through the slices, a slot at a time)"),
    ("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.set_lora"): (
        "ef1970818d16e864", "vllm_patches.cpu_lora_fused.restack, refresh (writes through the slices, a slot at a time)"),
    ("vllm.lora.layers.column_parallel_linear", "MergedColumnParallelLinearWithLoRA.set_lora"): (
        "9d907b749b44838f", "vllm_patches.cpu_lora_fused.restack, refresh (writes through the slices, a slot at a time)"),
    ("vllm.lora.layers.column_parallel_linear", "MergedColumnParallelLinearVariableSliceWithLoRA.set_lora"): (
        "ae6bbc5c565b3e80", "vllm_patches.cpu_lora_fused.refresh (writes a slot through the slices)"),
    ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA.create_lora_weights"): (
        "36f6fc7d9922ce3e", "vllm_patches.cpu_lora_logits (lora_a_stacked one tensor, made here)"),
    ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA.set_lora"): (
        "6ccfe6a7a67d33d9", "vllm_patches.cpu_lora_logits (called only for an adapter with an lm_head LoRA)"),
    ("vllm.lora.layers.logits_processor", "LogitsProcessorWithLoRA.reset_lora"): (
        "8a37b314d699dd08", "vllm_patches.cpu_lora_logits (zeroes the slot)"),
    ("vllm.lora.model_manager", "LoRAModelManager.activate_adapter"): (
        "7f5420ba072ce529", "vllm_patches.cpu_lora_logits (set_lora only for a module with weights, else reset_lora)"),
    ("vllm.sampling_params", "SamplingParams._validate_spec_decode"): (
        "430d50e706cdec12", "vllm_patches.spec_logits.patch (lifts this refusal)"),
}  # fmt: skip


def source_digest(module: str, qualname: str) -> str:
    """sha256[:16] of the source text of ``qualname`` (``Class.method`` or a function) in vLLM's ``module``,
    read from the file (a patched module attribute would hide it). Raises LookupError if it is gone."""
    path = importlib.util.find_spec(module).origin
    text = open(path).read()
    body = ast.parse(text).body
    node = None
    for part in qualname.split("."):
        node = next((n for n in body if getattr(n, "name", None) == part), None)
        if node is None:
            raise LookupError(f"{module}.{qualname} no longer exists")
        body = getattr(node, "body", [])
    return hashlib.sha256(ast.get_source_segment(text, node).encode()).hexdigest()[:16]


@pytest.mark.parametrize("upstream", sorted(COPIES), ids=lambda u: f"{u[0]}.{u[1]}")
def test_every_copied_vllm_function_is_the_text_our_copy_was_made_from(upstream):
    import vllm

    assert vllm.__version__ == vllm_patches.WRITTEN_FOR
    digest, ours = COPIES[upstream]
    assert source_digest(*upstream) == digest, (
        f"vLLM's {'.'.join(upstream)} changed: re-read {ours} against it, then update its digest here"
    )


# Run in a child: applying the patches changes vLLM's classes for the whole process.
_COLLECT = """
import inspect, json, sys
from server.engine import vllm_patches
vllm_patches.apply()
found = []
for name, mod in list(sys.modules.items()):
    if not name.startswith("vllm") or mod is None:
        continue
    owners = [mod] + [c for c in vars(mod).values() if inspect.isclass(c) and c.__module__ == name]
    for owner in owners:
        for attr, fn in list(vars(owner).items()):
            try:  # vLLM's placeholders for missing optional packages raise on any attribute
                ours_wrapper = inspect.isfunction(fn) and fn.__dict__.get("_qserve_patched") and "__wrapped__" in fn.__dict__
            except Exception:
                continue
            if ours_wrapper:
                code = fn.__code__
                ours = list(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
                if code.co_flags & inspect.CO_VARKEYWORDS and not code.co_flags & inspect.CO_VARARGS:
                    ours.append(code.co_varnames[len(ours)])  # (..., **kwargs) restates vLLM's **kwargs
                theirs = list(inspect.signature(fn.__wrapped__).parameters)
                found.append([f"{name}.{getattr(owner, '__name__', '')}.{attr}", ours, theirs,
                              bool(code.co_flags & inspect.CO_VARARGS), fn.__dict__.get("_qserve_reads")])
print(json.dumps(found))
"""


def test_every_wrapper_that_restates_parameters_restates_vllms():
    env = {**os.environ, "QSERVE_BATCH_INVARIANT": "1"}  # every patch, the opt-in one too
    env.pop("QSERVE_VLLM_PATCHES", None)
    out = subprocess.run([sys.executable, "-c", _COLLECT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    wrappers = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(wrappers) >= 10  # the scheduler, runner, sampler, detokenizer and serving wrappers
    for where, ours, theirs, star_args, reads in wrappers:
        if reads:  # a wrapper shared by ops whose other parameters differ in name: what it reads, where it reads it
            for name in reads:
                assert name in theirs and theirs.index(name) == ours.index(name), f"{where}: {name} moved: {theirs}"
        elif star_args:  # (self, *args, **kwargs): passes everything through, reads nothing by position
            assert ours == theirs[: len(ours)], f"{where}: leading parameters {ours} vs vLLM's {theirs}"
        else:
            assert ours == theirs, f"{where}: our wrapper takes {ours}, vLLM's function now takes {theirs}"
