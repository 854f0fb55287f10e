"""NF4 block size on the real model: how far NF4 moves SmolLM2-135M-Instruct from its bf16 weights.

Usage: python -m bench.nf4_block_size [--prompts 8] [--max-tokens 96] [--write BENCHMARKS.md]

The bf16 model (transformers, fp32 compute) answers the first ``--prompts`` held-out chat prompts
greedily; then every decoder linear weight is replaced by its NF4 round trip (bitsandbytes
``quantize_4bit`` + ``dequantize_4bit``, double quant, as vLLM's in-flight loader) at each block
size, and the quantized model is scored on those same answers: mean KL(bf16 || NF4) per answer
token (nats) and greedy agreement (argmax equal). Weight bytes come from bench.weight_memory's
formula at each block size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prompts import chat_prompts
from server.merge.weights.nf4 import nf4_roundtrip
from server.pairs import PAIRS
from server.precision import NF4_BLOCK_SIZE
from testing.report import argument_parser, publish

BLOCK_SIZES = (64, 32)


def main() -> None:
    ap = argument_parser(__doc__, threads=True)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(a.threads)
    folder = PAIRS["smollm2"].target
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    seqs = []
    with torch.no_grad():
        for q in chat_prompts(a.prompts):
            enc = tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            out = model.generate(**enc, max_new_tokens=a.max_tokens, do_sample=False)
            seqs.append((out, enc["input_ids"].shape[1]))
        ref = [F.log_softmax(model(s).logits[0, p - 1 : -1].float(), -1) for s, p in seqs]  # [T, V] each
        rows = []
        for bs in BLOCK_SIZES:
            for n, m in linears.items():
                m.weight.copy_(nf4_roundtrip(original[n], bs).float())
            kl = agree = total = 0.0
            for (s, p), r in zip(seqs, ref, strict=True):
                q = F.log_softmax(model(s).logits[0, p - 1 : -1].float(), -1)
                kl += (r.exp() * (r - q)).sum().item()
                agree += (r.argmax(-1) == q.argmax(-1)).sum().item()
                total += r.shape[0]
            rows.append((bs, kl / total, agree / total))
            print(f"block size {bs}: KL {kl / total:.3f} nats/token, greedy agreement {agree / total:.3f}", flush=True)
    n_params = sum(w.numel() for w in original.values())
    lines = [
        "## NF4 block size: SmolLM2-135M-Instruct, NF4 against its bf16 weights",
        "",
        f"Command: `python -m bench.nf4_block_size --prompts {a.prompts} --max-tokens {a.max_tokens}`"
        f" (the first {a.prompts} chat prompts of prompts/chat.txt, {int(total)} greedy answer tokens of the bf16"
        " model; transformers, fp32 compute; every decoder linear weight NF4 round-tripped, double quant).",
        "",
        "| NF4 block size | KL(bf16 \\|\\| NF4), nats/token | greedy agreement | absmax bytes per weight |",
        "|---:|---:|---:|---:|",
        *(
            f"| {bs}{' (served)' if bs == NF4_BLOCK_SIZE else ''} | {kl:.3f} | {agree:.3f} | {1 / bs:.4f} |"
            for bs, kl, agree in rows
        ),
        "",
        "The GGUF the model ships as is Q4_1 (one scale and minimum per 32 weights); NF4 blocks of 64 straddle two"
        " of its blocks. Blocks of 32 add one uint8 absmax per 32 weights instead of per 64"
        f" ({n_params / 64 / 2**20:.2f} MiB more over the {n_params / 1e6:.1f}M quantized weights).",
    ]
    publish(lines, a.write, "nf4_block_size")


if __name__ == "__main__":
    main()
