"""Distil a draft for SmolLM2-135M-Instruct (the real target) from the served target's own chat answers.

Two resumable stages in ``--run`` (git-ignored ``runs/``):

1. ``answers/``: ``python -m training.draft_data`` has the NF4 target, served by vLLM as our server
   serves it, answer the training prompts greedily (``training.chat_prompts``; the evaluation sets in
   ``prompts/`` are held out), keeping its top-20 log-probabilities at every answer position;
2. training (here): the draft minimises ``KL(p || q) + w * TV(p, q)`` over the teacher's buckets (top-k
   plus one tail bucket). ``1 - TV(p, q) = sum_x min(p(x), q(x))`` is the probability that speculative
   sampling accepts one draft token (Leviathan et al. 2023, section 3.3), so the TV term trains
   acceptance directly; over buckets TV is a lower bound of the full TV (acceptance reported here is an
   upper estimate). Greedy acceptance is the draft's full-vocabulary argmax equal to the target's.

Initialisation (``--init``): ``layers`` (default) copies the target's embedding (tied, frozen), its
first ``--layers`` decoder layers and its final norm, so the draft starts from the target's own
features (self-speculative drafts, Zhang et al. 2023, "Draft & Verify"); ``narrow`` builds a Llama of
width ``--hidden`` whose embedding is the target's on its top principal axes. The shared 49152-row
embedding/lm_head is most of a draft's cost at this size: ``layers`` with 4 layers is 42M
parameters, c = 0.20 measured (docs/stack-notes in BENCHMARKS.md), ``narrow`` at 256 is 15.7M.

Usage: python -m training.draft_data --run runs/draft-smollm2 && python -m training.train_draft --run runs/draft-smollm2
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

from training.real_model import DEFAULT_OUT, DRAFT_LAYERS

SEED = 1234


def with_tail(top: torch.Tensor) -> torch.Tensor:
    """Top-k log-probs ``top`` [N, k] -> [N, k + 1]: the tail bucket (the rest of the mass) appended last."""
    tail = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))  # [N]
    return torch.cat([top, tail[:, None]], -1)


def bucket_logq(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Draft log-probs over the teacher's buckets: ``logits`` [N, V], ``idx`` [N, k] -> [N, k+1] (tail last)."""
    logq = F.log_softmax(logits.float(), -1)
    return with_tail(logq.gather(-1, idx.long()))  # top-k [N, k] + tail


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


def build_draft(target, init: str, hidden: int, layers: int, heads: int, intermediate: int):
    """A Llama draft with the target's tokenizer and RoPE (see the module docstring for ``init``).

    ``layers``: the target's config with ``layers`` decoder layers, weights copied from its first ones,
    the tied embedding frozen. ``narrow``: width ``hidden``, ``heads`` x ``hidden // heads``; embedding =
    the target's (centred) on its top ``hidden`` principal axes, rescaled to the usual init std.
    Raises ValueError for an unknown ``init``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    t = target.config
    if init == "shipped":  # continue from the shipped draft (training.real_model assembles it)
        from transformers import AutoModelForCausalLM

        from training.real_model import DRAFT_OUT

        draft = AutoModelForCausalLM.from_pretrained(DRAFT_OUT, dtype=torch.float32)
        draft.get_input_embeddings().weight.requires_grad_(False)
        return draft
    if init == "layers":
        config = LlamaConfig(**(t.to_dict() | {"num_hidden_layers": layers}))
        draft = LlamaForCausalLM(config)
        own = draft.state_dict()
        draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in own}, strict=True)
        draft.get_input_embeddings().weight.requires_grad_(False)
        return draft
    if init != "narrow":
        raise ValueError(f"--init {init!r}: allowed are 'layers', 'shipped' and 'narrow'")
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


def load_answers(folder: Path, split: str) -> tuple[list, list]:
    """(seqs, buckets) of ``training.draft_data`` shards ``<split>*.pt`` in ``folder``; a bucket is
    (top-k ids [T, k] int32, log-probs [T, k + 1] with the tail bucket last).
    Raises FileNotFoundError naming the command that makes them."""
    files = sorted(folder.glob(f"{split}*.pt"))
    if not files:
        raise FileNotFoundError(f"no {split}*.pt in {folder}: run python -m training.draft_data --run {folder.parent}")
    seqs, buckets = [], []
    for f in files:
        shard = torch.load(f)
        for (ids, plen), idx, top in zip(shard["seqs"], shard["idx"], shard["logp"], strict=True):
            if len(ids) == plen:
                continue
            seqs.append((ids, plen))
            buckets.append((idx, with_tail(top)))
    return seqs, buckets


def batches(seqs, buckets, batch: int, rng: random.Random | None):
    """One batch (random with ``rng``, else the first ``batch``): right-padded ids [B, L] and, flattened over
    answer positions, (rows, cols, idx, logp)."""
    pick = rng.sample(range(len(seqs)), min(batch, len(seqs))) if rng else list(range(min(batch, len(seqs))))
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


def answer_logits(model, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``model``'s logits [N, V] at the N positions (``rows``, ``cols``) of ``x`` [B, L], equal to
    ``model(x).logits[rows, cols]``. The head runs on those positions only: over a whole padded batch its
    [B, L, 49152] logits are most of a step's time and memory, and prompt positions are not trained on. A PEFT
    model is read through its base model, which holds its LoRA layers in place."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(x).last_hidden_state  # [B, L, H]
    return causal_lm.lm_head(hidden[rows, cols])


def evaluate(draft, seqs, buckets, tv_weight: float, batch: int = 16) -> dict:
    """Mean loss terms of ``draft`` over every answer position of ``seqs`` (no gradient), weighted by positions."""
    draft.eval()
    totals, n = {}, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(seqs), batch):
            part = list(range(i, min(i + batch, len(seqs))))
            x, rows, cols, idx, logp = batches([seqs[j] for j in part], [buckets[j] for j in part], len(part), None)
            _, stats = lk_loss(logp, answer_logits(draft, x, rows, cols), idx, tv_weight)
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v * len(rows)
            n += len(rows)
    draft.train()
    return {k: v / n for k, v in totals.items()}


def fit(model, opt, train_set, heldout_set, a, log, start: int, warmup: int, save) -> dict:
    """Steps ``start`` .. ``a.steps`` of ``KL + a.tv_weight * TV`` (:func:`lk_loss`) for ``model``'s trainable
    parameters (the ones ``opt`` holds): ``a.batch`` random answers of ``train_set`` (seqs, buckets) a step,
    lr ``a.lr`` with ``warmup`` steps of linear warm-up then cosine to 10%, gradient norm clipped at 1, bf16
    autocast. Every ``a.eval_every`` steps and at the last, evaluates ``heldout_set`` and calls
    ``save(step, eval)`` (the checkpoint). Each step is a JSON line in ``log`` and on stdout. Returns the
    last evaluation (empty when none ran)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    rng = random.Random(SEED + start)
    started, last = time.time(), {}
    for step in range(start, a.steps):
        lr = a.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        x, rows, cols, idx, logp = batches(*train_set, a.batch, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = answer_logits(model, x, rows, cols)  # [N answer positions, V]
        loss, stats = lk_loss(logp, logits, idx, a.tv_weight)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        record = {"step": step + 1, "loss": round(loss.item(), 4), **{k: round(v, 4) for k, v in stats.items()}}
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            last = {k: round(v, 4) for k, v in evaluate(model, *heldout_set, a.tv_weight).items()}
            record["eval"] = last
            save(step + 1, last)
        record["seconds"] = round(time.time() - started, 1)
        log.write(json.dumps(record) + "\n")
        log.flush()
        print(json.dumps(record), flush=True)
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--run", type=Path, default=Path("runs/draft-smollm2"))
    ap.add_argument("--init", choices=("layers", "shipped", "narrow"), default="layers")
    ap.add_argument("--splits", default="train",
                    help="comma-separated shard prefixes trained on: train (draft_data), tf (teacher_forcing)")  # fmt: skip
    ap.add_argument("--hidden", type=int, default=256, help="width (narrow only)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4, help="attention heads (narrow only)")
    ap.add_argument("--intermediate", type=int, default=688, help="MLP width (narrow only)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--tv-weight", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--export", type=Path, default=DRAFT_LAYERS, help="where the shipped draft is written")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(a.threads)
    target = AutoModelForCausalLM.from_pretrained(a.target, dtype=torch.float32).eval()
    train, train_b = [], []
    for split in a.splits.split(","):
        seqs, buckets = load_answers(a.run / "answers", split)
        train, train_b = train + seqs, train_b + buckets
    heldout, heldout_b = load_answers(a.run / "answers", "eval")
    draft = build_draft(target, a.init, a.hidden, a.layers, a.heads, a.intermediate)
    del target
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    ckpt, start = a.run / "checkpoint.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt)
        draft.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    n_params = sum(p.numel() for p in draft.parameters())
    tokens = sum(len(s) - p for s, p in train)
    print(f"draft {n_params / 1e6:.2f}M parameters; {len(train)} train answers ({tokens} tokens), {len(heldout)} held out",
          flush=True)  # fmt: skip
    log = (a.run / "log.jsonl").open("a")
    if start == 0:
        before = {k: round(v, 4) for k, v in evaluate(draft, heldout, heldout_b, a.tv_weight).items()}
        log.write(json.dumps({"step": 0, "eval": before}) + "\n")
        print(json.dumps({"step": 0, "eval": before}), flush=True)

    def save(step: int, _eval: dict) -> None:
        torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)

    fit(draft, opt, (train, train_b), (heldout, heldout_b), a, log, start, warmup=20, save=save)
    export(draft, a.export, vars(a) | {"parameters": n_params, "train_answers": len(train), "train_tokens": tokens})


def export(draft, out: Path, info: dict) -> None:
    """Write ``draft`` as the repository ships it (``training.real_model.DRAFT_LAYERS``): config.json, its
    trained weights in bf16 without the embedding (the target's, re-added by ``assemble_draft``), and
    ``draft.json`` (the training arguments and data sizes)."""
    from safetensors.torch import save_file

    from training.real_model import EMBEDDING, LAYERS_FILE

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in draft.state_dict().items()}
    state = {k: v for k, v in state.items() if k not in (EMBEDDING, "lm_head.weight")}
    save_file(state, str(out / LAYERS_FILE), metadata={"format": "pt"})
    config = draft.config.to_dict() | {"dtype": "bfloat16", "architectures": ["LlamaForCausalLM"]}
    config.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "draft.json").write_text(json.dumps(info, default=str, indent=2) + "\n")


if __name__ == "__main__":
    main()
