"""An unquantized (bf16) draft beside an NF4 target.

Fault (vLLM 0.32.0): ``DraftModelProposer._create_draft_vllm_config`` (``v1/spec_decode/draft_model.py`` ~81)
gives the draft the target's ``load_config``. With an NF4 target that is ``load_format="bitsandbytes"``, whose
loader quantizes every projection it finds; for a draft built without quantization it finds none and stops
("vLLM currently does not support BNB quantization for LlamaForCausalLM", ``vllm_bnb_plugin``). The only way
vLLM offers around it, ``speculative_config.quantization = "bitsandbytes"``, serves the draft NF4 too, and on
a CPU without bitsandbytes' hub-fetched kernel every NF4 matmul dequantizes its weight first: for a draft of a
few million weights that is most of its cost (docs in BENCHMARKS.md, "Draft cost").

Fix: when the draft's own ``quantization`` is unset and the target loads with ``bitsandbytes``, the draft's
config gets ``load_format="auto"`` (vLLM's default loader, the checkpoint's dtype). The target is untouched,
and so is exactness: the target verifies whatever the draft proposes.
"""

from __future__ import annotations

import functools


def unquantized_draft_config(draft_vllm_config):
    """``draft_vllm_config`` (a ``VllmConfig``) with vLLM's default loader when the draft is unquantized and the
    target's loader is bitsandbytes; else unchanged."""
    from vllm.config.utils import replace

    load = draft_vllm_config.load_config
    if draft_vllm_config.model_config.quantization is None and load.load_format == "bitsandbytes":
        return replace(draft_vllm_config, load_config=replace(load, load_format="auto"))
    return draft_vllm_config


def patch() -> None:
    """Wrap ``DraftModelProposer._create_draft_vllm_config`` (idempotent)."""
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    original = DraftModelProposer._create_draft_vllm_config
    if getattr(original, "_qserve_patched", False):
        return

    @functools.wraps(original)
    def _create_draft_vllm_config(self):
        return unquantized_draft_config(original(self))

    _create_draft_vllm_config._qserve_patched = True
    DraftModelProposer._create_draft_vllm_config = _create_draft_vllm_config
