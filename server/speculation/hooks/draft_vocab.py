"""A reduced output vocabulary for the draft (FR-Spec: Zhao et al. 2025, "FR-Spec: Accelerating Large-Vocabulary
Language Models via Frequency-Ranked Speculative Sampling", arXiv 2502.14856).

Why: the real pair's draft is 4 decoder layers (14.2M weights) under a tied 49,152 x 576 head (28.3M): the
head is two thirds of a draft pass, though a few thousand tokens cover almost every token the target emits.
vLLM 0.32's ``draft_model`` has no reduced head (its ``use_heterogeneous_vocab`` maps between two tokenizers
and allows greedy drafting only).

What: a draft folder holding ``draft_vocab.json`` (``{"kept_token_ids": [...]}``, token ids of the shared
tokenizer, ranked by how often the target emits them, ``training/draft_vocab.py``) gets, after vLLM loads it, a ``compute_logits`` that
multiplies the hidden states by the kept rows of the head only ([B, H] x [H, N]) and returns [B, V] logits
that are -inf outside the kept set. The draft's distribution q is then 0 outside the set, so it proposes
only kept tokens, and speculative sampling stays exact (Leviathan et al. 2023: acceptance min(1, p/q) on
proposed tokens, the residual max(p - q, 0) elsewhere covers every token the draft cannot propose); the
target still verifies over all 49,152. Without the file the draft is unchanged.

Hook: ``DraftModelProposer._get_model`` (``v1/spec_decode/draft_model.py`` ~103), after it returns; the
draft's logits are computed only through ``model.compute_logits`` (``v1/spec_decode/llm_base_proposer.py``
~443-485). The draft's LoRA adapters adapt the decoder projections, never the head.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger("vllm.qserve.draft_vocab")
FILE = "draft_vocab.json"


def read_kept_ids(folder: str | Path) -> list[int] | None:
    """The kept token ids of the draft in ``folder``, None when it has no ``draft_vocab.json``.

    Raises:
        ValueError: the file is not ``{"kept_token_ids": [distinct non-negative ints]}``.
    """
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    ids = json.loads(path.read_text()).get("kept_token_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"{path}: kept_token_ids must be a non-empty list of token ids")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: kept_token_ids has repeated ids")
    return ids


class ReducedHead:
    """``compute_logits`` over the kept rows of a head: ``head_weight`` [V', H] (V' >= ``vocab_size``, padded),
    ``kept`` token ids [N]; returns logits [B, ``vocab_size``], -inf outside ``kept``."""

    def __init__(self, head_weight: torch.Tensor, kept: list[int], vocab_size: int) -> None:
        if max(kept) >= vocab_size:
            raise ValueError(f"kept token id {max(kept)} is outside the draft's vocabulary of {vocab_size}")
        self.kept = torch.tensor(kept, dtype=torch.long, device=head_weight.device)  # [N]
        self.weight = head_weight.detach()[self.kept].contiguous()  # [N, H]
        self.vocab_size = vocab_size

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        kept_logits = torch.nn.functional.linear(hidden_states, self.weight)  # [B, N]
        logits = kept_logits.new_full((hidden_states.shape[0], self.vocab_size), float("-inf"))  # [B, V]
        return logits.index_copy_(1, self.kept, kept_logits)


def install(model, folder: str | Path) -> bool:
    """Give the loaded draft ``model`` the reduced head its ``folder`` asks for; False when it asks none."""
    kept = read_kept_ids(folder)
    if kept is None:
        return False
    vocab_size = model.config.vocab_size
    model.compute_logits = ReducedHead(model.lm_head.weight, kept, vocab_size)
    log.info("draft_vocab: the draft proposes from %d of %d tokens (%s)", len(kept), vocab_size, Path(folder) / FILE)
    return True


def patch() -> None:
    """Wrap ``DraftModelProposer._get_model`` (idempotent)."""
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    original = DraftModelProposer._get_model
    if getattr(original, "_qserve_patched", False):
        return

    @functools.wraps(original)
    def _get_model(self):
        model = original(self)
        install(model, self.speculative_config.draft_model_config.model)
        return model

    _get_model._qserve_patched = True
    DraftModelProposer._get_model = _get_model
