"""Distil a narrow Llama draft for SmolLM2-135M-Instruct (the real target) from the target's own chat answers.

Three resumable stages in ``--run`` (git-ignored ``runs/``):

1. ``answers-*.pt``: the target answers the training prompts (``prompts/``: chat, python-docs and style
   sets, minus the first ``--eval`` of each, kept for evaluation), once greedily and ``--samples``
   times sampled at temperature 1;
2. ``teacher-<samples>.pt``: the target's next-token distribution at every answer position, kept as its top
   ``--topk`` log-probabilities plus the tail mass (one bucket), so the target runs once;
3. training: the draft (same tokenizer; hidden 256, 4 layers, 4 heads x 64, tied embedding
   initialised from the target's by PCA) minimises ``KL(p || q) + w * TV(p, q)`` over those buckets.
   ``1 - TV(p, q) = sum_x min(p(x), q(x))`` is the probability that speculative sampling accepts one
   draft token (Leviathan et al. 2023, section 3.3), so the TV term trains acceptance directly;
   over buckets, TV is a lower bound of the full TV (acceptance reported here is an upper estimate).

Usage: nice -n 19 python -m training.train_draft --run runs/draft-smollm2 --steps 400 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import prompts
from training.real_model import DEFAULT_OUT

SEED = 1234
DOMAINS = ("chat", "python-docs", "style")


def prompt_sets(n_eval: int, n_train: int | None = None) -> tuple[list[str], list[str]]:
    """(train prompts, eval prompts): the first ``n_eval`` of each domain are held out, the next ``n_train`` (all) trained on."""
    train, heldout = [], []
    for domain in DOMAINS:
        lines = prompts.domain_prompts(domain)
        heldout += lines[:n_eval]
        train += lines[n_eval:][:n_train]
    return train, heldout


@torch.no_grad()
def answer(
    target, tok, questions: list[str], sample: bool, max_new: int, batch: int = 16
) -> list[tuple[list[int], int]]:
    """The target's chat answer to each question: (prompt + answer token ids ending at EOS, prompt length)."""
    tok.padding_side = "left"
    # temperature 1 with no top-k/top-p cut: the target's own distribution, what speculative sampling verifies
    how = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    out = []
    for i in range(0, len(questions), batch):
        chats = [[{"role": "user", "content": q}] for q in questions[i : i + batch]]
        enc = tok.apply_chat_template(
            chats, add_generation_prompt=True, return_tensors="pt", padding=True, return_dict=True
        )
        gen = target.generate(**enc, max_new_tokens=max_new, **how)
        width = enc["input_ids"].shape[1]
        for row, mask in zip(gen, enc["attention_mask"], strict=True):
            prompt = row[:width][mask.bool()].tolist()
            ans = row[width:].tolist()
            if tok.eos_token_id in ans:
                ans = ans[: ans.index(tok.eos_token_id) + 1]
            out.append((prompt + ans, len(prompt)))
        print(f"  answered {min(i + batch, len(questions))}/{len(questions)} (sample={sample})", flush=True)
    return out


@torch.no_grad()
def teacher_buckets(target, seqs: list[tuple[list[int], int]], topk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence: (top-k token ids [T, k] int32, log-probs [T, k+1] with the tail bucket last) at its T answer positions."""
    out = []
    for ids, plen in seqs:
        logp = F.log_softmax(target(torch.tensor([ids])).logits[0, plen - 1 : -1].float(), -1)  # [T, V]
        top, idx = logp.topk(topk, -1)  # [T, k]
        tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))  # [T]
        out.append((idx.int(), torch.cat([top, tail[:, None]], -1)))
    return out


def bucket_logq(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Draft log-probs over the teacher's buckets: ``logits`` [N, V], ``idx`` [N, k] -> [N, k+1] (tail last)."""
    logq = F.log_softmax(logits.float(), -1)
    top = logq.gather(-1, idx.long())  # [N, k]
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
    return torch.cat([top, tail[:, None]], -1)


def lk_loss(logp: torch.Tensor, logits: torch.Tensor, idx: torch.Tensor, tv_weight: float) -> tuple[torch.Tensor, dict]:
    """``KL(p||q) + tv_weight * TV(p, q)`` averaged over N positions, over the teacher's buckets.

    ``logp`` [N, k+1] teacher bucket log-probs, ``logits`` [N, V] draft logits, ``idx`` [N, k] teacher top-k ids.
    Also returns the mean KL (nats), mean acceptance ``sum min(p, q)`` and greedy agreement (full-vocabulary argmax
    of the draft equal to the teacher's top-1: the acceptance at temperature 0).
    """
    logq = bucket_logq(logits, idx)
    p, q = logp.exp(), logq.exp()
    kl = (p * (logp - logq)).sum(-1).mean()
    accept = torch.minimum(p, q).sum(-1).mean()
    loss = kl + tv_weight * (1 - accept)
    agree = (logits.argmax(-1) == idx[:, 0]).float().mean()  # topk is sorted: column 0 is the teacher's argmax
    return loss, {"kl": kl.item(), "accept": accept.item(), "argmax": agree.item()}


def build_draft(target, hidden: int, layers: int, heads: int, intermediate: int):
    """A Llama draft with the target's tokenizer and RoPE; embedding = the target's (centred) on its top ``hidden`` principal axes, rescaled to the usual init std."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = target.config
    config = LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=hidden // heads, intermediate_size=intermediate,
        max_position_embeddings=t.max_position_embeddings, rms_norm_eps=t.rms_norm_eps,
        rope_parameters=dict(t.rope_parameters), tie_word_embeddings=True,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, pad_token_id=t.pad_token_id,
    )  # fmt: skip
    draft = LlamaForCausalLM(config)
    emb = target.get_input_embeddings().weight.detach().float()  # [V, H_t]
    centred = emb - emb.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: [H_t, H_t], rows = principal axes
    projected = centred @ vh[:hidden].T  # [V, hidden]
    # Keep the geometry, not the scale: at the target's scale the random layers give logits peaked far from uniform.
    projected *= config.initializer_range / projected.std()
    draft.get_input_embeddings().weight.data.copy_(projected)
    draft.tie_weights()
    return draft


def batches(seqs, buckets, batch: int, rng: random.Random):
    """One random batch: right-padded ids [B, L] and, flattened over answer positions, (rows, cols, idx, logp)."""
    pick = rng.sample(range(len(seqs)), min(batch, len(seqs)))
    width = max(len(seqs[i][0]) for i in pick)
    x = torch.zeros(len(pick), width, dtype=torch.long)
    rows, cols, idx, logp = [], [], [], []
    for r, i in enumerate(pick):
        ids, plen = seqs[i]
        x[r, : len(ids)] = torch.tensor(ids)
        t = len(ids) - plen
        rows.append(torch.full((t,), r))
        cols.append(torch.arange(plen - 1, len(ids) - 1))
        idx.append(buckets[i][0])
        logp.append(buckets[i][1])
    return x, torch.cat(rows), torch.cat(cols), torch.cat(idx), torch.cat(logp)


def evaluate(draft, seqs, buckets, tv_weight: float) -> dict:
    """Mean loss terms of ``draft`` over every answer position of ``seqs`` (no gradient)."""
    draft.eval()
    with torch.no_grad():
        x, rows, cols, idx, logp = batches(seqs, buckets, len(seqs), random.Random(0))
        logits = draft(x).logits[rows, cols]  # [N, V]
        _, stats = lk_loss(logp, logits, idx, tv_weight)
    draft.train()
    return stats


def cached(path: Path, make):
    """``torch.load(path)`` if it exists, else ``make()`` saved there."""
    if path.exists():
        return torch.load(path)
    value = make()
    torch.save(value, path)
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--run", type=Path, default=Path("runs/draft-smollm2"))
    ap.add_argument("--eval", type=int, default=8, help="prompts of each domain held out for evaluation")
    ap.add_argument("--train-prompts", type=int, help="train prompts per domain (all when omitted)")
    ap.add_argument("--samples", type=int, default=2, help="sampled answers per prompt, besides the greedy one")
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tv-weight", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(SEED)
    torch.set_num_threads(a.threads)
    a.run.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(a.target)
    target = AutoModelForCausalLM.from_pretrained(a.target, dtype=torch.float32).eval()
    train_q, eval_q = prompt_sets(a.eval, a.train_prompts)

    # One cache file per part, so a rerun with more samples keeps what was generated.
    data = {"eval": cached(a.run / "answers-eval.pt", lambda: answer(target, tok, eval_q, False, a.max_new))}
    data["train"] = cached(a.run / "answers-greedy.pt", lambda: answer(target, tok, train_q, False, a.max_new))
    for i in range(a.samples):
        data["train"] = data["train"] + cached(
            a.run / f"answers-sample{i}.pt", lambda: answer(target, tok, train_q, True, a.max_new)
        )
    teach = cached(
        a.run / f"teacher-{a.samples}.pt", lambda: {k: teacher_buckets(target, v, a.topk) for k, v in data.items()}
    )
    draft = build_draft(target, a.hidden, a.layers, a.heads, a.intermediate)
    opt = torch.optim.AdamW(draft.parameters(), lr=a.lr, weight_decay=0.0)
    ckpt, start = a.run / "checkpoint.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt)
        draft.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    n_params = sum(p.numel() for p in draft.parameters())
    print(
        f"draft {n_params / 1e6:.2f}M parameters; {len(data['train'])} train / {len(data['eval'])} eval answers",
        flush=True,
    )
    log = (a.run / "log.jsonl").open("a")
    rng = random.Random(SEED + start)
    started = time.time()
    for step in range(start, a.steps):
        lr = a.lr * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, rows, cols, idx, logp = batches(data["train"], teach["train"], a.batch, rng)
        loss, stats = lk_loss(logp, draft(x).logits[rows, cols], idx, a.tv_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        record = {"step": step + 1, "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in stats.items()}}
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            record["eval"] = {
                k: round(v, 4) for k, v in evaluate(draft, data["eval"], teach["eval"], a.tv_weight).items()
            }
            torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "step": step + 1}, ckpt)
        record["seconds"] = round(time.time() - started, 1)
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)
    draft.to(torch.bfloat16).save_pretrained(a.run / "model")  # served bf16 or NF4, like the demo models
    tok.save_pretrained(a.run / "model")
    (a.run / "model" / "draft.json").write_text(json.dumps(vars(a) | {"parameters": n_params}, default=str, indent=2))


if __name__ == "__main__":
    main()
