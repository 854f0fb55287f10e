"""Measure the demo draft's acceptance rate against the demo target with vLLM (k draft tokens).

Usage: python -m training.measure_acceptance --quantization none --out models/draft/acceptance_bf16.json

Runs vLLM's offline engine with draft-model speculative decoding on held-out
prompts (never trained on) at temperature 0 and 1 and sums each request's
speculative-decoding metrics (``CompletionOutput.spec_decode_metrics``). With
``--prompt-set chat`` (an instruct pair such as SmolLM2 and ``training/train_draft.py``'s
draft) the prompts are the first ``--prompts`` chat prompts, sent through the chat template;
train_draft holds out the first 8 of each set by default.

- acceptance rate = accepted draft tokens / proposed draft tokens;
- mean acceptance length = 1 + accepted / verification steps (tokens emitted
  per target forward pass, counting the bonus token).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from prompts import chat_prompts, heldout_prompts


def summarize(outputs) -> dict:
    """Sum the per-request spec-decode metrics of vLLM ``RequestOutput``s into rates."""
    steps = drafted = accepted = 0
    per_position = None
    for out in outputs:
        for comp in out.outputs:
            m = comp.spec_decode_metrics
            hist = m.histogram  # hist[j]: verify steps that accepted exactly j drafts
            steps += sum(hist)
            drafted += m.num_draft_tokens
            accepted += sum(j * c for j, c in enumerate(hist))
            if per_position is None:
                per_position = [0] * (len(hist) - 1)
            for pos in range(len(per_position)):  # position pos accepted iff j > pos
                per_position[pos] += sum(hist[pos + 1 :])
    return {
        "verify_steps": steps,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "mean_acceptance_length": round(1 + accepted / steps, 4) if steps else 1.0,
        "acceptance_by_position": [round(a / steps, 4) for a in per_position] if steps else [],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Measure draft acceptance with vLLM.")
    ap.add_argument("--target", default="models/target")
    ap.add_argument("--draft", default="models/draft")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--quantization", choices=["none", "nf4"], default="none")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument(
        "--prompt-set",
        choices=["heldout", "chat"],
        default="heldout",
        help="held-out corpus passages (completions, ignore_eos) or chat prompts (chat template, stop at EOS)",
    )
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--draft-sample-method", choices=["probabilistic", "greedy"], default="probabilistic")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    spec = {
        "method": "draft_model",
        "model": args.draft,
        "num_speculative_tokens": args.k,
        "draft_sample_method": args.draft_sample_method,
    }
    kwargs = {}
    if args.quantization == "nf4":
        kwargs["quantization"] = "bitsandbytes"
        spec["quantization"] = "bitsandbytes"
    llm = LLM(
        model=args.target,
        dtype="bfloat16",
        speculative_config=spec,
        per_request_spec_decode_metrics="summary",
        max_model_len=1024,
        seed=0,
        **kwargs,
    )
    chat = args.prompt_set == "chat"
    prompts = chat_prompts(args.prompts) if chat else heldout_prompts(args.prompts)
    result = {
        "target": args.target,
        "draft": args.draft,
        "k": args.k,
        "quantization": args.quantization,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "command": "python -m training.measure_acceptance "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
    }
    for temperature in (0.0, 1.0):
        started = time.time()
        params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens, ignore_eos=not chat)
        if chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outs = llm.generate(prompts, params)
        result[f"temperature_{temperature:g}"] = summarize(outs) | {"seconds": round(time.time() - started, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
