"""Train the demo target from scratch, or distill the demo draft from the target.

Usage:
    python -m training.train_lm --role target --out models/target
    python -m training.train_lm --role draft --teacher models/target --out models/draft

Both are Llama-architecture causal LMs (head size 64, as the vLLM CPU backend
requires) sharing ``models/tokenizer``. The target learns by next-token
cross-entropy. The draft learns by distillation (Hinton et al. 2015): it
minimises KL(p_target || q_draft) over the whole next-token distribution, mixed
with cross-entropy on the data. Matching the target's distribution is what
speculative decoding rewards: the expected acceptance of one drafted token is
sum_x min(p(x), q(x)) = 1 - TV(p, q) (Leviathan et al. 2023, "Fast Inference
from Transformers via Speculative Decoding", section 3.2).

Training is seeded, shows a tqdm progress bar, and writes a resumable
checkpoint (model, optimizer, step, RNG state) every ``--ckpt-every`` steps
under ``runs/<role>/``; rerunning the same command resumes from it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from prompts import BASE_FILES
from training.corpus import load_splits

SEED = 1234


@dataclass(frozen=True)
class Shape:
    """Llama shape of one demo model. ``hidden // heads`` must be 64."""

    hidden: int
    layers: int
    heads: int
    intermediate: int


SHAPES = {
    "target": Shape(hidden=384, layers=6, heads=6, intermediate=1024),
    "draft": Shape(hidden=192, layers=3, heads=3, intermediate=512),
}


def build_model(shape: Shape, vocab_size: int, tokenizer) -> LlamaForCausalLM:
    """Return a randomly initialised ``LlamaForCausalLM`` of ``shape`` (fp32)."""
    if shape.hidden // shape.heads != 64:
        raise ValueError(f"head size must be 64 for the vLLM CPU backend, got {shape.hidden // shape.heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16",
    )
    return LlamaForCausalLM(config)


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """Concatenate ``texts`` into one token stream, each text ended by EOS. Returns ``[N]`` int64."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def batch_at(stream: torch.Tensor, gen: torch.Generator, batch: int, seq: int) -> torch.Tensor:
    """Sample ``batch`` random windows of ``seq + 1`` tokens. Returns ``[batch, seq + 1]``."""
    starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, seq: int, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy (nats/token) over non-overlapping held-out windows."""
    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        windows = torch.stack([stream[j * seq : j * seq + seq + 1] for j in range(i, min(n, i + 8))])
        logits = model(windows[:, :-1]).logits  # [B, S, V]
        loss = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="sum")
        total += loss.item()
        count += windows[:, 1:].numel()
    model.train()
    return total / count


@torch.no_grad()
def expected_acceptance(draft, target, stream: torch.Tensor, seq: int, max_windows: int = 32) -> dict:
    """Teacher-forced acceptance estimates of ``draft`` against ``target`` on held-out text.

    Returns per-token ``alpha_t1`` = E[1 - TV(p, q)] (temperature 1, Leviathan et
    al. 2023 eq. 1) and ``alpha_t0`` = P[argmax q = argmax p] (greedy).
    """
    draft.eval()
    target.eval()
    n = min(max_windows, (len(stream) - 1) // seq)
    windows = torch.stack([stream[j * seq : j * seq + seq] for j in range(n)])  # [n, S]
    t1, t0 = [], []
    for i in range(0, n, 8):
        x = windows[i : i + 8]
        p = target(x).logits.float().softmax(-1)  # [B, S, V]
        q = draft(x).logits.float().softmax(-1)
        t1.append(torch.minimum(p, q).sum(-1).flatten())
        t0.append((p.argmax(-1) == q.argmax(-1)).float().flatten())
    return {"alpha_t1": torch.cat(t1).mean().item(), "alpha_t0": torch.cat(t0).mean().item()}


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of ``peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the demo target or distill the demo draft.")
    ap.add_argument("--role", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, default=Path("models/tokenizer"))
    ap.add_argument("--teacher", type=Path, help="target model folder (draft distillation)")
    ap.add_argument("--corpora", type=Path, required=True, help="the folder of the corpus texts")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--distill-weight", type=float, default=0.8, help="weight of KL vs cross-entropy")
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.role == "draft" and args.teacher is None:
        ap.error("--role draft needs --teacher (the trained target folder)")

    torch.manual_seed(SEED)
    random.seed(SEED)
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    splits = load_splits(args.corpora)
    run_dir = Path("runs") / args.role
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = run_dir / "tokens.pt"
    if cache.exists():
        train_stream, heldout_stream = torch.load(cache)
    else:
        train_stream = encode(tokenizer, [s.train for s in splits])
        heldout_stream = encode(tokenizer, [s.heldout for s in splits])
        torch.save((train_stream, heldout_stream), cache)
    print(f"train tokens {len(train_stream):,}, held-out tokens {len(heldout_stream):,}")

    model = build_model(SHAPES[args.role], len(tokenizer), tokenizer)
    teacher = None
    if args.teacher is not None:
        teacher = LlamaForCausalLM.from_pretrained(args.teacher, torch_dtype=torch.float32).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(SEED)
    step = 0
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        print(f"resumed from {ckpt} at step {step}")

    n_params = sum(p.numel() for p in model.parameters())
    model.train()
    started = time.time()
    bar = tqdm(total=args.steps, initial=step, desc=f"{args.role} ({n_params / 1e6:.1f}M params)")
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=max(1, args.steps // 20))
        x = batch_at(train_stream, gen, args.batch, args.seq)  # [B, S+1]
        logits = model(x[:, :-1]).logits  # [B, S, V]
        ce = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                p_log = teacher(x[:, :-1]).logits.log_softmax(-1)  # [B, S, V]
            kl = F.kl_div(logits.log_softmax(-1), p_log, log_target=True, reduction="batchmean") / args.seq
            loss = args.distill_weight * kl + (1 - args.distill_weight) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", ce=f"{ce.item():.3f}")
        if step % args.ckpt_every == 0 or step == args.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "step": step,
                },
                tmp,
            )
            tmp.replace(ckpt)
    bar.close()

    loss_ho = heldout_loss(model, heldout_stream, args.seq)
    tokens_seen = args.steps * args.batch * args.seq
    report = {
        "role": args.role,
        "parameters": n_params,
        "shape": asdict(SHAPES[args.role]),
        "vocab_size": len(tokenizer),
        "corpus": list(BASE_FILES),
        "train_tokens_in_corpus": len(train_stream),
        "tokens_seen": tokens_seen,
        "steps": args.steps,
        "batch": args.batch,
        "seq": args.seq,
        "lr": args.lr,
        "seed": SEED,
        "heldout_loss": round(loss_ho, 4),
        "heldout_perplexity": round(math.exp(loss_ho), 2),
        "train_seconds_this_run": round(time.time() - started, 1),
    }
    if teacher is not None:
        report["distill_weight"] = args.distill_weight
        report["teacher"] = str(args.teacher)
        report["teacher_forced_acceptance"] = {
            k: round(v, 4) for k, v in expected_acceptance(model, teacher, heldout_stream, args.seq).items()
        }
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    (args.out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
