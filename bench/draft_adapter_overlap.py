"""Offline estimate of what a draft adapter does to speculative acceptance (transformers, no vLLM).

On each shipped adapter's own held-out text, teacher-forced, per token position:
``E[1 - TV(p, q)]`` (the expected acceptance of one draft token under
speculative sampling at temperature 1, Leviathan et al. 2023, section 3.3) and
``P[argmax q = argmax p]`` (the same at temperature 0), for three pairs:

- base target p vs plain draft q (the base model's own acceptance, reference);
- target + adapter p vs plain draft q (the adapter served per request today:
  vLLM applies no LoRA to the draft);
- target + adapter p vs draft + its draft adapter q (a merged target with its merged draft).

Target and draft are both NF4-dequantized (bitsandbytes NF4, blocks of NF4_BLOCK_SIZE, double
quant; the engine serves both NF4) and computed in float32; adapters are PEFT's own
forward. The target + adapter stands for the merged target too (bench/merge_fidelity.py
measures how close they are). This is an estimate, not vLLM's measured acceptance rate.

Usage: python -m bench.draft_adapter_overlap [--windows 16] [--seq 128] [--write BENCHMARKS.md]
"""

from __future__ import annotations

import time

import torch

from server.merge.weights.checkpoint import read_state
from server.merge.weights.fidelity import greedy_agreement, mean_overlap
from server.merge.weights.nf4 import base_weights
from server.merge.weights.probe import model_with
from server.precision import Precision
from testing.process import REPO_ROOT
from testing.report import argument_parser, publish
from training.train_adapter import heldout_texts
from training.train_lm import encode

DOMAINS = {"austen": "austen", "stdlib-docs": "stdlib"}


def windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` evenly spaced windows of ``seq`` tokens from ``stream`` [N]: [n, seq]."""
    starts = torch.linspace(0, len(stream) - seq - 1, n).long().tolist()
    return torch.stack([stream[s : s + seq] for s in starts])


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token logits at every position of ``x`` [n, seq], flattened: [n * seq, V]."""
    return model(x).logits.flatten(0, 1)


def main() -> None:
    ap = argument_parser(__doc__, threads=True)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    started = time.time()
    target, draft = REPO_ROOT / "models/target", REPO_ROOT / "models/draft"
    tok = AutoTokenizer.from_pretrained(target)
    t_nf4 = base_weights(read_state(target), Precision.NF4)
    d_nf4 = base_weights(read_state(draft), Precision.NF4)
    p_base_model, q_plain_model = model_with(target, t_nf4), model_with(draft, d_nf4)
    rows = []
    for name, domain in DOMAINS.items():
        x = windows(encode(tok, heldout_texts(domain)), a.windows, a.seq)  # [n, seq]
        p_base, q_plain = logits(p_base_model, x), logits(q_plain_model, x)
        p_adapt = logits(model_with(target, t_nf4, REPO_ROOT / "adapters/demo" / name), x)
        q_adapt = logits(model_with(draft, d_nf4, REPO_ROOT / "adapters/demo" / name / "draft"), x)
        for pair, p, q in (
            ("base target vs plain draft (reference)", p_base, q_plain),
            ("target + adapter vs plain draft (adapter per request)", p_adapt, q_plain),
            ("target + adapter vs draft + draft adapter (merged pair)", p_adapt, q_adapt),
        ):
            rows.append((name, pair, mean_overlap(p, q), greedy_agreement(p, q)))
            print(f"{name:12s} {pair:58s} 1-TV {rows[-1][2]:.4f}  argmax {rows[-1][3]:.4f}", flush=True)
    cmd = f"python -m bench.draft_adapter_overlap --windows {a.windows} --seq {a.seq}"
    lines = [
        "## Draft adapters: offline acceptance estimate (teacher-forced, no vLLM)",
        "",
        f"Command: `{cmd}` ({time.time() - started:.0f} s on the 2-core CPU; transformers, float32, target and"
        f" draft NF4-dequantized). {a.windows} windows x {a.seq} tokens of each adapter's held-out text."
        " E[1 - TV(p, q)]: expected acceptance of a draft token at temperature 1; argmax agreement: at"
        " temperature 0. An estimate from distributions, not vLLM's measured acceptance rate.",
        "",
        "| adapter's text | target vs draft | E[1 - TV(p, q)] | argmax agreement |",
        "|---|---|---:|---:|",
        *[f"| {n} | {pair} | {tv:.4f} | {g:.4f} |" for n, pair, tv, g in rows],
    ]
    publish(lines, a.write, "draft_adapter_overlap")


if __name__ == "__main__":
    main()
