"""Train a LoRA adapter on the demo target with PEFT (optionally QLoRA: against the NF4 base).

Usage:
    python -m training.train_adapter --domain austen --qlora --out adapters/austen
    python -m training.train_adapter --domain stdlib --out adapters/stdlib-docs
    python -m training.train_adapter --domain austen --qlora --base models/draft --out adapters/austen/draft

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
eq. 5): Y = X doubleDequant(c1, c2, W_NF4) + s X L1 L2, only L1, L2 trained.
With ``--qlora`` every linear weight of the decoder layers is quantized by
bitsandbytes exactly as its ``Linear4bit`` stores it (NF4, blocks of ``NF4_BLOCK_SIZE``, double
quantization) and dequantized again, so the LoRA learns against the very
weights the NF4 base computes with (and that vLLM serves). ``--qlora-impl
linear4bit`` instead loads the base through transformers' ``BitsAndBytesConfig``
+ ``prepare_model_for_kbit_training`` as most QLoRA scripts do; on this CPU
build bitsandbytes 0.50.2's ``Linear4bit`` returns wrong input gradients once
it has run one eval-mode forward (reproduction and numbers:
docs/upstream/bnb_cpu_linear4bit_grad_after_eval.py), so it is not the default.
Without ``--qlora`` the base is the bf16 checkpoint (upcast to fp32).

Domains: ``austen`` (Pride and Prejudice from ../shared/corpora, a style the
base never saw) and ``stdlib`` (the Python standard library's docstrings,
far from the base's literature). Writes the PEFT files and a card to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import prompts
from server.merge.weights.nf4 import nf4_roundtrip
from server.peft import PROJECTIONS
from training.corpus import load_splits
from training.stdlib_text import split_docstrings, stdlib_docstrings
from training.train_lm import SEED, batch_at, encode, heldout_loss

ALL_MODULES = list(PROJECTIONS)


def domain_text(domain: str, corpora: Path | None) -> tuple[list[str], list[str], str]:
    """(train texts, held-out texts, description) of ``domain``; ``corpora`` is the corpus folder (austen only).

    Raises:
        ValueError: ``austen`` without a corpus folder.
    """
    if domain == "austen":
        if corpora is None:
            raise ValueError("the austen domain trains on the corpus text: pass --corpora DIR")
        s = load_splits(corpora, ("austen_pride_and_prejudice.txt",))[0]
        return [s.train], [s.heldout], "Pride and Prejudice, J. Austen (../shared/corpora; last 2% held out)"
    train, heldout = split_docstrings(stdlib_docstrings())
    return train, heldout, "Python standard library docstrings, extracted with ast (every 20th held out)"


def heldout_texts(domain: str) -> list[str]:
    """The held-out texts ``domain_text(domain, corpora)`` returns, read from the repository (no corpus folder).

    Austen's comes from ``prompts/heldout/``, the stdlib docstrings from this Python's own library.
    """
    if domain == "austen":
        return [prompts.heldout_text("austen_pride_and_prejudice.txt")]
    return split_docstrings(stdlib_docstrings())[1]


def load_base(path: Path, qlora: bool, impl: str = "dequantized"):
    """The demo target for adapter training: NF4 base (QLoRA) or bf16 upcast to fp32."""
    if not qlora:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if impl == "dequantized":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            for module in model.model.layers.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(nf4_roundtrip(module.weight).float())
        return model
    from peft import prepare_model_for_kbit_training

    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=torch.float32)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def main() -> None:
    from peft import LoraConfig, get_peft_model

    ap = argparse.ArgumentParser(description="Train a LoRA adapter (PEFT) on a target or draft model folder.")
    ap.add_argument("--domain", choices=["austen", "stdlib"], required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", type=Path, default=Path("models/target"))
    ap.add_argument("--qlora", action="store_true", help="train against the NF4-quantized base (QLoRA)")
    ap.add_argument("--qlora-impl", choices=["dequantized", "linear4bit"], default="dequantized")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--corpora", type=Path, help="the folder of the corpus texts (needed by --domain austen)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--autocast", choices=["none", "bf16"], default="none",
        help="bf16: forward and backward in bf16 autocast (fp32 master weights; fast on CPUs with AMX)",
    )  # fmt: skip
    args = ap.parse_args()
    if args.domain == "austen" and args.corpora is None:
        ap.error("--domain austen trains on Pride and Prejudice: pass --corpora DIR (the corpora folder)")

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.base)
    train_texts, heldout_texts, source = domain_text(args.domain, args.corpora)
    train_stream, heldout_stream = encode(tokenizer, train_texts), encode(tokenizer, heldout_texts)
    model = load_base(args.base, args.qlora, args.qlora_impl)
    loss_before = heldout_loss(model, heldout_stream, args.seq)

    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=ALL_MODULES)
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    started = time.time()
    bar = tqdm(range(args.steps), desc=f"adapter {args.domain} ({'QLoRA, NF4 base' if args.qlora else 'LoRA'})")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = (
                args.lr * min(1.0, (step + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
            )
        x = batch_at(train_stream, gen, args.batch, args.seq)  # [B, S+1]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
            logits = model(x[:, :-1]).logits  # [B, S, V]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    loss_after = heldout_loss(model, heldout_stream, args.seq)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    cfg_path = args.out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(args.base)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    n_params = sum(p.numel() for p in trainable)
    cmd = (
        f"python -m training.train_adapter --domain {args.domain}"
        f"{' --qlora --qlora-impl ' + args.qlora_impl if args.qlora else ''} --base {args.base} --out {args.out} "
        f"--rank {args.rank} --alpha {args.alpha:g} --steps {args.steps} --batch {args.batch} --seq {args.seq} --lr {args.lr}"
        f"{' --autocast bf16' if args.autocast == 'bf16' else ''}{' --corpora CORPORA' if args.corpora else ''}"
    )
    report = {
        "domain": args.domain,
        "base": str(args.base),
        "data": source,
        "train_tokens": len(train_stream),
        "heldout_tokens": len(heldout_stream),
        "qlora": args.qlora,
        "qlora_impl": args.qlora_impl if args.qlora else None,
        "rank": args.rank,
        "alpha": args.alpha,
        "target_modules": ALL_MODULES,
        "trainable_parameters": n_params,
        "steps": args.steps,
        "tokens_seen": args.steps * args.batch * args.seq,
        "heldout_loss_base": round(loss_before, 4),
        "heldout_loss_adapted": round(loss_after, 4),
        "train_seconds": round(time.time() - started, 1),
        "seed": SEED,
        "command": cmd,
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    base_kind = (
        f"`{args.base}` NF4-quantized (QLoRA, bitsandbytes, double quant)" if args.qlora else f"`{args.base}` in bf16"
    )
    title = f"{args.out.parent.name}/draft (draft adapter)" if args.out.name == "draft" else args.out.name
    card = f"""# adapter: {title}

LoRA adapter for `{args.base}`, trained with PEFT against {base_kind}.

| | |
|---|---|
| rank r | {args.rank} |
| alpha | {args.alpha:g} (scale alpha/r = {args.alpha / args.rank:g}) |
| target modules | {", ".join(ALL_MODULES)} (all {model.config.num_hidden_layers} layers) |
| trainable parameters | {n_params:,} |
| data | {source} |
| steps | {args.steps} x {args.batch} x {args.seq} tokens ({report["tokens_seen"]:,} tokens seen) |
| held-out loss, base | {loss_before:.4f} nats/token (perplexity {math.exp(loss_before):.1f}) |
| held-out loss, with adapter | {loss_after:.4f} nats/token (perplexity {math.exp(loss_after):.1f}) |
| seed | {SEED} |

Held-out loss is measured on the same base the adapter was trained against.

Made by: `{cmd}`
"""
    (args.out / "README.md").write_text(card)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
