"""Probe a model with fixed token sequences: float32 transformers models over checkpoint weights.

Helpers the merge fidelity numbers are computed with (``bench/merge_fidelity.py``,
``tests/merge/test_fidelity_bound.py``): a model of a base folder's architecture
holding given weights, optionally with a PEFT adapter on top; greedy decoding;
teacher-forced logits. All compute is float32 with transformers on CPU (no vLLM).
"""

from __future__ import annotations

from pathlib import Path

import torch


def model_with(base_dir: Path, weights: dict[str, torch.Tensor], adapter: Path | None = None) -> torch.nn.Module:
    """``base_dir``'s architecture in float32 holding ``weights``, with the PEFT ``adapter`` on top if given.

    ``weights`` maps the checkpoint's tensor names to tensors of any float dtype
    (upcast to float32). ``lm_head.weight`` may be absent: the shipped models tie it
    to ``model.embed_tokens.weight``. Returns the model in eval mode, on CPU.

    Raises:
        ValueError: if ``weights`` names a tensor the architecture lacks, or lacks
            one it has (other than the tied ``lm_head.weight``).
        Whatever transformers or PEFT raise for an unreadable folder or an adapter
        that does not fit the base.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):  # lm_head is tied to the embeddings
        raise ValueError(f"weights do not fit {base_dir}: missing {missing}, unexpected {unexpected}")
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt_ids: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """Each prompt's ids [1, P] followed by exactly ``tokens`` greedy tokens: [1, P + tokens] each (int64).

    End-of-sequence is suppressed until ``tokens`` tokens are out (``min_new_tokens``),
    so every sequence has the same continuation length.
    """
    return [
        model.generate(ids, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens, pad_token_id=0)
        for ids in prompt_ids
    ]


@torch.no_grad()
def continuation_logits(model: torch.nn.Module, seqs: list[torch.Tensor], tokens: int) -> list[torch.Tensor]:
    """Teacher-forced logits predicting the last ``tokens`` tokens of each sequence [1, L]: [tokens, V] each.

    Row t is the distribution over token ``L - tokens + t`` given everything before it
    (float32, the model's dtype).
    """
    return [model(s).logits[0, -tokens - 1 : -1] for s in seqs]
