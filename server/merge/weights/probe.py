"""Probe a merge's fidelity: run each merge option and the unmerged adapter on fixed prompts, compare.

The reference p is the adapter unmerged on the NF4-dequantized base (PEFT's own
LoRA forward over :func:`server.merge.weights.nf4.base_weights` ``Precision.NF4``: the
weights vLLM's NF4 base computes with, and the base a QLoRA adapter was trained
against, Dettmers et al. 2023). It greedy-decodes ``tokens`` tokens after each
probe prompt; every candidate reads the same token sequences (teacher-forced), and
:mod:`server.merge.weights.fidelity` compares the two next-token distributions position
by position. All compute is float32 with transformers on CPU (no vLLM), so the
numbers measure what a merge does to the weights, not bf16 compute noise.

Works for any base folder + PEFT adapter folder that fits it: the target with
``adapters/<name>/``, the draft (``models/draft``) with ``adapters/<name>/draft/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from server.merge.weights.checkpoint import read_state
from server.merge.weights.fidelity import greedy_agreement, mean_kl
from server.merge.weights.lora import load_lora, merge_lora
from server.merge.weights.nf4 import base_weights, requantize
from server.precision import Precision

REFERENCE = "adapter unmerged on the NF4-dequantized base"
NO_ADAPTER = "no adapter (NF4 base)"
# Building the reference and greedy-decoding with it costs about 4 candidates' scoring
# (measured: ~4.8 s vs ~1.2 s each, target, 8 prompts x 16 tokens, 1 thread); progress counts it so.
REFERENCE_STEPS = 4
PRECISIONS = ("bf16", "nf4")  # the served precision: the stored bf16 merge, or re-quantized in flight to NF4

# Fixed, so reports from different merges compare. Written for this file (not drawn
# from the training corpora): two registers the shipped adapters were trained on
# (a 19th-century novel, Python standard library documentation) and plain questions.
PROBE_PROMPTS = [
    "It was generally agreed in the neighbourhood that Mr. Ashford had come into a considerable fortune.",
    "Miss Harriet Lacey could not think of the evening at Netherby without some degree of vexation.",
    "Her mother was of the opinion that a young woman of sense ought never to",
    "The shutil module offers a number of high-level operations on files and collections of files.",
    "Return a new list containing all items from the iterable in ascending order.",
    "If the optional argument timeout is given, the call blocks for at most timeout seconds.",
    "What is the best way to keep a small garden watered through a dry summer?",
    "Why do people enjoy reading the same old stories again and again?",
]


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


def fidelity_report(
    base_dir: Path,
    adapter_dir: Path,
    prompts: list[str] = PROBE_PROMPTS,
    tokens: int = 16,
    check: Callable[[], None] | None = None,
    progress: Callable[[float], None] | None = None,
) -> dict:
    """How closely each merge option of ``adapter_dir`` into ``base_dir`` follows the adapter served unmerged.

    The reference greedy-decodes ``tokens`` tokens after each of ``prompts``; each
    candidate is scored teacher-forced on those sequences, averaged over prompts:
    greedy agreement (fraction of positions where argmax candidate = argmax reference)
    and mean KL(reference || candidate) in nats/token. Candidates are the 4 options
    ``merge_base`` (:class:`Precision`: the delta added to the NF4-dequantized or the
    bf16 base; the merge stored bf16) x ``precision`` (served as stored, ``"bf16"``,
    or re-quantized to NF4 as vLLM's in-flight quantization does, ``"nf4"``), plus a
    context row: the NF4 base without the adapter.

    Returns a JSON-serialisable dict::

        {"reference": REFERENCE, "prompts": n, "tokens_per_prompt": tokens,
         "options": {"merge_base=nf4,precision=bf16": {"merge_base": "nf4", "precision": "bf16",
                     "greedy_agreement": float, "mean_kl": float}, ...},
         "context": {NO_ADAPTER: {"greedy_agreement": float, "mean_kl": float}},
         "seconds": float}

    One model is built at a time and dropped before the next; the caller sets
    torch's thread count (this does not). ``check()`` is called before each model
    is built and between the reference's prompts, and may raise (e.g. a cancellation),
    which propagates and stops the report; ``progress(fraction)`` is called with 0.0,
    then increasing fractions up to 1.0.

    Raises:
        ValueError: if ``prompts`` is empty or ``tokens`` < 1.
        MergeRefused: the adapter cannot be merged into this base (see
            :func:`server.merge.weights.lora.load_lora`, :func:`server.merge.weights.lora.merge_lora`).
        FileNotFoundError: a model or adapter file is missing.
    """
    from transformers import AutoTokenizer

    if not prompts or tokens < 1:
        raise ValueError(f"need at least one prompt and one token, got {len(prompts)} prompts, tokens={tokens}")
    step = check or (lambda: None)
    report = progress or (lambda fraction: None)
    started = time.monotonic()
    steps = REFERENCE_STEPS + len(Precision) * len(PRECISIONS) + 1  # then one per candidate, context included
    report(0.0)
    step()
    tok = AutoTokenizer.from_pretrained(base_dir)
    prompt_ids = [tok(p, return_tensors="pt").input_ids for p in prompts]  # [1, P] each, BOS first
    state = read_state(base_dir)
    nf4_base = base_weights(state, Precision.NF4)
    lora = load_lora(adapter_dir)
    merged = {Precision.NF4: merge_lora(nf4_base, lora)}  # refuses an adapter that does not fit before any model
    step()
    with torch.no_grad():
        model = model_with(base_dir, nf4_base, adapter_dir)
        seqs: list[torch.Tensor] = []  # [1, P + tokens] each
        for i, ids in enumerate(prompt_ids):  # decoding is the longest stretch: check between prompts
            if i:
                step()
            seqs += greedy(model, [ids], tokens)
            report(REFERENCE_STEPS * (i + 1) / len(prompt_ids) / steps)
        ref = continuation_logits(model, seqs, tokens)  # [tokens, V] each
        del model
        done = REFERENCE_STEPS

        def score(weights: dict[str, torch.Tensor]) -> dict[str, float]:
            nonlocal done
            step()
            model = model_with(base_dir, weights)
            got = continuation_logits(model, seqs, tokens)
            del model
            done += 1
            report(done / steps)
            pairs = list(zip(ref, got, strict=True))
            return {
                "greedy_agreement": sum(greedy_agreement(r, g) for r, g in pairs) / len(pairs),
                "mean_kl": sum(mean_kl(r, g) for r, g in pairs) / len(pairs),
            }

        options = {}
        for merge_base in Precision:  # NF4, then BF16
            if merge_base not in merged:
                merged[merge_base] = merge_lora(base_weights(state, merge_base), lora)
            stored = merged.pop(merge_base)  # bf16, as a merge is stored
            for precision in PRECISIONS:
                served = stored if precision == "bf16" else requantize(stored)
                key = f"merge_base={merge_base.value},precision={precision}"
                options[key] = {"merge_base": merge_base.value, "precision": precision, **score(served)}
                del served
            del stored
        context = {NO_ADAPTER: score(nf4_base)}
    return {
        "reference": REFERENCE,
        "prompts": len(prompts),
        "tokens_per_prompt": tokens,
        "options": options,
        "context": context,
        "seconds": round(time.monotonic() - started, 3),
    }
