"""Offline merge fidelity: each merge option against the adapter served unmerged on the NF4 base.

For each shipped adapter and each option {add the delta to the NF4-dequantized
base, to the original bf16} x {serve the bf16 merge as is, re-quantize it to NF4
as vLLM's in-flight ``--quantization bitsandbytes`` does}, on held-out probe
prompts (``prompts.heldout_prompts``):

- the reference p is PEFT's LoRA forward on the NF4-dequantized base
  (bitsandbytes NF4, blocks of NF4_BLOCK_SIZE, double quant: the weights vLLM's NF4 base
  computes with), greedy-decoded for ``--tokens`` tokens per prompt;
- each candidate q reads the same token sequences (teacher-forced), and we report
  greedy agreement (argmax q = argmax p), mean KL(p || q) per token (nats), and how
  many prompts' free-running greedy continuations equal the reference's exactly.

All compute is float32 on CPU with transformers (no vLLM), so the numbers
measure what the merge does to the weights, not bf16 compute noise. Two context
rows: the NF4 base without the adapter, and the adapter unmerged on the bf16
base (what ``--quantization none`` serves).

Usage: python -m bench.merge_fidelity [--prompts 16] [--tokens 32] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import time

import torch

from bench.report import argument_parser, publish
from prompts import heldout_prompts
from server.merge.weights.checkpoint import read_state
from server.merge.weights.fidelity import greedy_agreement, mean_kl
from server.merge.weights.lora import load_lora, merge_lora
from server.merge.weights.nf4 import base_weights, requantize
from server.merge.weights.probe import continuation_logits, greedy, model_with
from server.precision import NF4_BLOCK_SIZE, Precision
from testing.process import REPO_ROOT

ADAPTERS = ("austen", "stdlib-docs")


def main() -> None:
    ap = argument_parser(__doc__, threads=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    started = time.time()
    target = REPO_ROOT / "models/target"
    tok = AutoTokenizer.from_pretrained(target)
    prompts = heldout_prompts(a.prompts)
    prompt_ids = [tok(p, return_tensors="pt").input_ids for p in prompts]  # [1, P], BOS first
    state = read_state(target)
    nf4_base = base_weights(state, Precision.NF4)
    rows = []  # (adapter, option, agreement, kl, exact continuations)
    for name in ADAPTERS:
        adapter = REPO_ROOT / "models/demo-adapters" / name
        ref_model = model_with(target, nf4_base, adapter)
        ref_seqs = greedy(ref_model, prompt_ids, a.tokens)
        ref = continuation_logits(ref_model, ref_seqs, a.tokens)
        candidates = {"context: NF4 base, no adapter": model_with(target, nf4_base)}
        candidates["context: adapter unmerged on the bf16 base"] = model_with(target, state, adapter)
        lora = load_lora(adapter)
        for merge_base in (Precision.NF4, Precision.BF16):
            merged = merge_lora(base_weights(state, merge_base), lora)  # bf16, as stored
            candidates[f"merge into {merge_base.value} base, serve bf16"] = model_with(target, merged)
            candidates[f"merge into {merge_base.value} base, serve NF4 (re-quantized)"] = model_with(
                target, requantize(merged)
            )
        for option, model in candidates.items():
            got = continuation_logits(model, ref_seqs, a.tokens)
            agree = sum(greedy_agreement(r, g) for r, g in zip(ref, got, strict=True)) / len(ref)
            kl = sum(mean_kl(r, g) for r, g in zip(ref, got, strict=True)) / len(ref)
            free = greedy(model, prompt_ids, a.tokens)
            exact = sum(torch.equal(f, r) for f, r in zip(free, ref_seqs, strict=True))
            rows.append((name, option, agree, kl, exact))
            print(f"{name:12s} {option:55s} agree {agree:.4f}  KL {kl:.2e}  exact {exact}/{len(prompts)}", flush=True)

    cmd = f"python -m bench.merge_fidelity --prompts {a.prompts} --tokens {a.tokens}"
    lines = [
        "## Merge fidelity: merged weights vs the adapter served unmerged on the NF4 base",
        "",
        f"Command: `{cmd}` ({time.time() - started:.0f} s on the 2-core CPU; transformers, float32 compute, no vLLM).",
        f"Reference: PEFT LoRA on the NF4-dequantized target (bitsandbytes NF4, blocks of {NF4_BLOCK_SIZE}, double quant),"
        f" greedy, {a.prompts} held-out prompts x {a.tokens} tokens. Agreement: teacher-forced argmax equal to the"
        " reference's token; KL(p_ref || p_merged) per token, nats; exact: prompts whose free-running greedy"
        f' continuation ({a.tokens} tokens) equals the reference\'s. Merges are stored bf16; "serve NF4" applies'
        " quantize_4bit + dequantize_4bit to the merged weights as vLLM's in-flight quantization does.",
        "",
        "| adapter | option | greedy agreement | mean KL (nats/token) | exact continuations |",
        "|---|---|---:|---:|---:|",
        *[f"| {n} | {o} | {g:.4f} | {k:.2e} | {e}/{a.prompts} |" for n, o, g, k, e in rows],
    ]
    publish(lines, a.write, "merge_fidelity")


if __name__ == "__main__":
    main()
