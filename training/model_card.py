"""Write the model card (README.md) of a demo model from its training report and measurements.

Usage: python -m training.model_card models/target
       python -m training.model_card models/draft
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _acceptance_rows(model_dir: Path) -> list[str]:
    rows = []
    for path in sorted(model_dir.glob("acceptance_*.json")):
        m = json.loads(path.read_text())
        for t in ("0", "1"):
            r = m[f"temperature_{t}"]
            rows.append(
                f"| {m['quantization']} | {t} | {m['k']} | {r['acceptance_rate']:.3f} | "
                f"{r['mean_acceptance_length']:.2f} | {', '.join(f'{x:.2f}' for x in r['acceptance_by_position'])} | "
                f"{m['prompts']} x {m['max_tokens']} |"
            )
    cmds = sorted({json.loads(p.read_text())["command"] for p in model_dir.glob("acceptance_*.json")})
    if not rows:
        return []
    return [
        "## Acceptance against the demo target (vLLM, held-out prompts)",
        "",
        "| quantization | temperature | k | acceptance rate | mean acceptance length | accepted by position | prompts x tokens |",
        "|---|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        "Made by: " + "; ".join(f"`{c}`" for c in cmds),
        "",
        "Greedy acceptance matches the teacher-forced estimate once compounded over k positions "
        "(per-position acceptance a^i); at temperature 1 it follows E[1 - TV(p, q)]. Both need the server's "
        "vLLM patches (server/engine/vllm_patches.py) and `draft_sample_method: probabilistic`: without them vLLM 0.32.0's "
        "CPU build accepted 0.004 of draft tokens at temperature 1 (docs/upstream/vllm_cpu_speculation_sampling.md).",
        "",
    ]


def card(model_dir: Path) -> str:
    """Markdown card of ``model_dir`` (needs ``training_report.json`` written by training.train_lm)."""
    r = json.loads((model_dir / "training_report.json").read_text())
    cfg = json.loads((model_dir / "config.json").read_text())
    role = r["role"]
    if role == "target":
        cmd = (
            f"python -m training.train_lm --role target --out {model_dir} "
            f"--steps {r['steps']} --batch {r['batch']} --lr {r['lr']}"
        )
        purpose = "the demo **target** model served by the project (NF4 by default)."
    else:
        cmd = (
            f"python -m training.train_lm --role draft --teacher {r['teacher']} --out {model_dir} "
            f"--steps {r['steps']} --batch {r['batch']} --lr {r['lr']} --distill-weight {r['distill_weight']}"
        )
        purpose = "the demo **draft** model for draft-target speculative decoding with `models/target`."
    lines = [
        f"# demo-{role}",
        "",
        f"A small Llama-architecture causal LM trained from scratch on CPU by this repository: {purpose}",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {r['parameters']:,} ({r['parameters'] / 1e6:.1f}M, embeddings tied) |",
        f"| shape | hidden {cfg['hidden_size']}, layers {cfg['num_hidden_layers']}, heads "
        f"{cfg['num_attention_heads']} x 64, MLP {cfg['intermediate_size']}, vocab {cfg['vocab_size']} |",
        "| tokenizer | byte-level BPE, `models/tokenizer` (shared by target and draft) |",
        f"| corpus | {', '.join(r['corpus'])} (../shared/corpora, last 2% of each held out) |",
        f"| tokens in training split | {r['train_tokens_in_corpus']:,} |",
        f"| tokens seen | {r['tokens_seen']:,} ({r['steps']} steps x {r['batch']} x {r['seq']}) |",
        f"| held-out loss | {r['heldout_loss']:.4f} nats/token |",
        f"| held-out perplexity | {r['heldout_perplexity']:.2f} |",
        f"| seed | {r['seed']} |",
        "| weights | `model.safetensors`, bf16 |",
    ]
    if role == "draft":
        tf = r["teacher_forced_acceptance"]
        lines += [
            f"| objective | {r['distill_weight']} x KL(target ‖ draft) + {1 - r['distill_weight']:.1f} x cross-entropy |",
            f"| teacher-forced acceptance, temperature 1: E[1 - TV(p, q)] | {tf['alpha_t1']:.3f} |",
            f"| teacher-forced acceptance, greedy: P[argmax q = argmax p] | {tf['alpha_t0']:.3f} |",
        ]
    lines += ["", f"Made by: `{cmd}` (resumable; checkpoints in `runs/{role}/`).", ""]
    lines += _acceptance_rows(model_dir)
    lines += [
        "Not instruction-tuned: it continues English prose in the style of its corpus. "
        "It exists to exercise the serving stack with real, trained weights.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        path = Path(arg)
        (path / "README.md").write_text(card(path))
        print(f"wrote {path / 'README.md'}")
