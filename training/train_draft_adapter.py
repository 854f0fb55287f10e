"""Distil an adapter's draft adapter: a LoRA on the draft that tracks the target *with that adapter*.

A target adapter moves the target's next-token distribution; the plain draft keeps proposing what the
base would say, and acceptance falls. The draft adapter is trained to close that gap on the prompts
the adapter is served on, by the same objective as the draft itself (``training.train_draft``):
``KL(p || q) + w * TV(p, q)`` over the adapted target's top-20 buckets plus a tail bucket, where
``1 - TV(p, q)`` is the probability that speculative sampling accepts one draft token (Leviathan et al.
2023, section 3.3). It is not trained on the adapter's own raw corpus: the draft is verified against
the adapted target's answers, not against the corpus the target adapter was fitted to.

Data (``--run DIR/answers``): ``python -m training.draft_data --run DIR --adapter ADAPTER --domain D``
(vLLM serves the NF4 target with the adapter and keeps its top-20 log-probs at each answer position).
The draft is loaded as served: the assembled folder, its decoder linears rounded through NF4
(``server.precision.NF4_BLOCK_SIZE``), so the LoRA learns against the weights vLLM runs (QLoRA).

Writes ``--out`` (normally ``adapters/NAME/draft``): PEFT ``adapter_config.json`` +
``adapter_model.safetensors``, ``training_report.json`` and a card with held-out (teacher-forced)
acceptance and greedy agreement before and after. Resumable from ``DIR/lora-checkpoint.pt``.

Usage: python -m training.train_draft_adapter --run runs/draft-stdlib-docs --out adapters/stdlib-docs/draft
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from training.real_model import DRAFT_OUT, MODELS
from training.train_adapter import ALL_MODULES, load_base
from training.train_draft import SEED, evaluate, fit, load_answers


def train(draft, train_set, heldout_set, a: argparse.Namespace, log) -> dict:
    """Train the LoRA parameters of ``draft`` (a PEFT model) for ``a.steps`` steps on ``train_set`` (seqs,
    buckets); evaluates ``heldout_set`` every ``a.eval_every`` steps, checkpointing. Returns the last eval."""
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    ckpt, start, last = a.run / "lora-checkpoint.pt", 0, {}
    if ckpt.exists():
        state = torch.load(ckpt)
        draft.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["opt"])
        start, last = state["step"], state["eval"]

    def save(step: int, last: dict) -> None:
        lora_state = {k: v for k, v in draft.state_dict().items() if "lora_" in k}
        torch.save({"model": lora_state, "opt": opt.state_dict(), "step": step, "eval": last}, ckpt)

    return fit(draft, opt, train_set, heldout_set, a, log, start, warmup=10, save=save) or last


def shown_path(path: Path) -> str:
    """``path`` as the shipped files name it: relative to the repository when inside it (a clone's own path)."""
    path = path.resolve()
    return str(path.relative_to(MODELS.parent)) if path.is_relative_to(MODELS.parent) else str(path)


def card(report: dict) -> str:
    """The draft adapter's README.md from its ``training_report.json`` dict."""
    b, f = report["heldout_before"], report["heldout_after"]
    return f"""# adapter: {report["adapter"]}/draft (draft adapter)

LoRA adapter for the draft `{report["draft"]}`, distilled from the NF4 target served *with* the
`{report["adapter"]}` adapter (PEFT; the draft's decoder linears rounded through NF4 as vLLM serves
them). Applied per request by the server to every request for `{report["adapter"]}`.

| | |
|---|---|
| rank r | {report["rank"]} |
| alpha | {report["alpha"]:g} (scale alpha/r = {report["alpha"] / report["rank"]:g}) |
| target modules | {", ".join(report["target_modules"])} (all {report["layers"]} layers) |
| trainable parameters | {report["trainable_parameters"]:,} |
| data | the adapted target's greedy chat answers to {report["train_answers"]} `{report["domain"]}` training prompts (`training.chat_prompts.domain_training_prompts`): {report["train_tokens"]:,} answer tokens with its top-20 log-probs |
| loss | KL(p \\|\\| q) + {report["tv_weight"]:g} x TV(p, q) over the teacher's top-20 buckets + tail |
| steps | {report["steps"]} x {report["batch"]} answers, AdamW lr {report["lr"]:g}, {report["train_seconds"]:.0f} s |
| held-out prompts | `prompts/{report["domain"].replace("-", "_")}.txt` ({report["heldout_answers"]}), never trained on |

Held-out, teacher-forced on the adapted target's greedy answers:

| | plain draft | with this draft adapter |
|---|---:|---:|
| greedy agreement (draft argmax = target's) | {b["argmax"]:.3f} | {f["argmax"]:.3f} |
| acceptance sum min(p, q) over buckets | {b["accept"]:.3f} | {f["accept"]:.3f} |
| KL(p \\|\\| q), nats | {b["kl"]:.3f} | {f["kl"]:.3f} |

Made by: `{report["command"]}`
"""


def main() -> None:
    from peft import LoraConfig, get_peft_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="folder whose answers/ training.draft_data wrote")
    ap.add_argument("--out", type=Path, required=True, help="the draft adapter folder (adapters/NAME/draft)")
    ap.add_argument("--draft", type=Path, default=DRAFT_OUT, help="the assembled draft folder")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8, help="answers per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tv-weight", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    source = a.run / "answers" / "source.json"  # which adapter and prompt domain training.draft_data served
    meta = json.loads(source.read_text()) if source.is_file() else {}
    torch.manual_seed(SEED)
    torch.set_num_threads(a.threads)
    train_set = load_answers(a.run / "answers", "train")
    heldout_set = load_answers(a.run / "answers", "eval")
    base = load_base(a.draft, qlora=True, impl="dequantized")
    config = LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=ALL_MODULES)
    draft = get_peft_model(base, config)
    before = {k: round(v, 4) for k, v in evaluate(draft, *heldout_set, a.tv_weight).items()}
    print(json.dumps({"step": 0, "eval": before}), flush=True)
    started = time.time()
    with (a.run / "lora-log.jsonl").open("a") as log:
        after = train(draft, train_set, heldout_set, a, log)
    a.out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(a.out, safe_serialization=True)
    cfg_path = a.out / "adapter_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"base_model_name_or_path": shown_path(a.draft)},
                                   indent=2, sort_keys=True) + "\n")  # fmt: skip
    report = {
        "adapter": meta.get("adapter", a.out.parent.name), "domain": meta.get("domain", "?"), "draft": shown_path(a.draft),
        "rank": a.rank, "alpha": a.alpha, "target_modules": ALL_MODULES, "layers": base.config.num_hidden_layers,
        "trainable_parameters": sum(p.numel() for p in draft.parameters() if p.requires_grad),
        "train_answers": len(train_set[0]), "train_tokens": sum(len(s) - p for s, p in train_set[0]),
        "heldout_answers": len(heldout_set[0]), "tv_weight": a.tv_weight, "steps": a.steps, "batch": a.batch,
        "lr": a.lr, "train_seconds": round(time.time() - started, 1), "heldout_before": before, "heldout_after": after,
        "seed": SEED,
        "command": f"python -m training.train_draft_adapter --run {a.run} --out {a.out} --rank {a.rank} "
        f"--alpha {a.alpha:g} --steps {a.steps} --batch {a.batch} --lr {a.lr:g} --tv-weight {a.tv_weight:g}",
    }  # fmt: skip
    (a.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out / "README.md").write_text(card(report))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
