"""Offline merge fidelity: each merge option against the adapter served unmerged on the NF4 base.

For each of the pair's shipped adapters and each option {add the delta to the NF4-dequantized
base, to the original bf16} x {serve the bf16 merge as is, re-quantize it to NF4
as vLLM's in-flight ``--quantization bitsandbytes`` does}, on probe prompts (``prompts.pair_prompts``:
for the smollm2 pair the adapter's own chat prompts, stdlib-docs prompts/python_docs.txt and austen
prompts/style.txt, each one user message in the target's chat template; for the demo pair held-out
book text, the same for both adapters):

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

Usage: python -m bench.merge_fidelity [--pair smollm2] [--prompts 16] [--tokens 32] [--threads 1]
       [--write BENCHMARKS.md]
"""

from __future__ import annotations

import time

import torch

from prompts import CHAT_PAIRS, pair_prompts
from server.merge.weights.checkpoint import read_state
from server.merge.weights.fidelity import greedy_agreement, mean_kl
from server.merge.weights.lora import load_lora, merge_lora
from server.merge.weights.nf4 import base_weights, requantize
from server.merge.weights.probe import continuation_logits, greedy, model_with
from server.pairs import PAIRS
from server.precision import NF4_BLOCK_SIZE, Precision
from testing.report import argument_parser, pair_heading, pair_key, publish

ADAPTERS = ("austen", "stdlib-docs")


def prompt_ids(tok, prompts: list[str], chat: bool) -> list[torch.Tensor]:
    """Each of ``prompts`` as token ids [1, P] (int64): with ``chat`` one user message in ``tok``'s chat
    template, the assistant's turn opened (``add_generation_prompt``); else the text itself, BOS first."""
    if not chat:
        return [tok(p, return_tensors="pt").input_ids for p in prompts]
    return [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        for p in prompts
    ]


def main() -> None:
    ap = argument_parser(__doc__, threads=True, pair=True)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    started = time.time()
    pair, chat = PAIRS[a.pair], a.pair in CHAT_PAIRS
    target = pair.target
    tok = AutoTokenizer.from_pretrained(target)
    state = read_state(target)
    nf4_base = base_weights(state, Precision.NF4)
    rows = []  # (adapter, option, agreement, kl, exact continuations)
    for name in ADAPTERS:
        adapter = pair.seed_adapters / name
        ids = prompt_ids(tok, pair_prompts(a.pair, name, a.prompts), chat)
        ref_model = model_with(target, nf4_base, adapter)
        ref_seqs = greedy(ref_model, ids, a.tokens)
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
            free = greedy(model, ids, a.tokens)
            exact = sum(torch.equal(f, r) for f, r in zip(free, ref_seqs, strict=True))
            rows.append((name, option, agree, kl, exact))
            print(f"{name:12s} {option:55s} agree {agree:.4f}  KL {kl:.2e}  exact {exact}/{len(ids)}", flush=True)

    cmd = f"python -m bench.merge_fidelity --pair {a.pair} --prompts {a.prompts} --tokens {a.tokens}"
    what = "chat prompts of each adapter's domain (chat template)" if chat else "held-out prompts"
    lines = [
        pair_heading("Merge fidelity: merged weights vs the adapter served unmerged on the NF4 base", a.pair),
        "",
        f"Command: `{cmd}` ({time.time() - started:.0f} s on the 2-core CPU; transformers, float32 compute, no vLLM).",
        f"Reference: PEFT LoRA on the NF4-dequantized target (bitsandbytes NF4, blocks of {NF4_BLOCK_SIZE}, double quant),"
        f" greedy, {a.prompts} {what} x {a.tokens} tokens. Agreement: teacher-forced argmax equal to the"
        " reference's token; KL(p_ref || p_merged) per token, nats; exact: prompts whose free-running greedy"
        f' continuation ({a.tokens} tokens) equals the reference\'s. Merges are stored bf16; "serve NF4" applies'
        " quantize_4bit + dequantize_4bit to the merged weights as vLLM's in-flight quantization does.",
        "",
        "| adapter | option | greedy agreement | mean KL (nats/token) | exact continuations |",
        "|---|---|---:|---:|---:|",
        *[f"| {n} | {o} | {g:.4f} | {k:.2e} | {e}/{a.prompts} |" for n, o, g, k, e in rows],
    ]
    publish(lines, a.write, pair_key("merge_fidelity", a.pair))


if __name__ == "__main__":
    main()
