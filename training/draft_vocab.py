"""The draft's reduced output vocabulary (FR-Spec, arXiv 2502.14856): the tokens the target emits most often.

Counts, over the answer positions of distillation shards (``training.teacher_forcing`` and
``training.draft_data``), how often each token is the target's own top-1 next token: the tokens a greedy
target emits on that text. Ranks by that count, ties (most of the unseen tail) by token id (BPE ids follow
merge order, a frequency order of the tokenizer's own corpus), always keeps the tokenizer's special tokens,
and writes the top ``--size`` to ``<draft folder>/draft_vocab.json`` (read by
``server/speculation/hooks/draft_vocab.py``). Prints the held-out coverage: the share of the target's
top-1 tokens, on the shards left out of the count (``--heldout``), that the kept set contains.

Usage: python -m training.draft_vocab --run runs/draft-smollm2 --size 16384 --out models/smollm2-135m-draft-layers
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

VOCAB = 49152  # SmolLM2's tokenizer


def top1_tokens(files: list[Path]) -> torch.Tensor:
    """The target's top-1 token at every answer position of the shards ``files`` [positions] int64."""
    return torch.cat([i[:, 0].long() for f in files for i in torch.load(f)["idx"]])


def rank(counts: torch.Tensor) -> torch.Tensor:
    """Token ids by descending ``counts`` [V], ties by ascending id [V]."""
    score = counts.double() - torch.arange(len(counts), dtype=torch.float64) / len(counts)
    return torch.argsort(score, descending=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=Path("runs/draft-smollm2"))
    ap.add_argument("--size", type=int, default=16384, help="tokens kept")
    ap.add_argument("--heldout", type=int, default=1, help="shards left out of the count, to measure coverage")
    ap.add_argument("--special", type=int, default=17, help="ids 0..N-1 are special tokens, always kept")
    ap.add_argument("--out", type=Path, required=True, help="the draft folder to write draft_vocab.json into")
    a = ap.parse_args()
    files = sorted((a.run / "answers").glob("tf-*.pt")) + sorted((a.run / "answers").glob("train-*.pt"))
    if len(files) <= a.heldout:
        ap.error(f"need more than {a.heldout} shards in {a.run / 'answers'}; found {len(files)}")
    counted, heldout = files[: len(files) - a.heldout], files[len(files) - a.heldout :]
    tokens = top1_tokens(counted)
    counts = torch.bincount(tokens, minlength=VOCAB)
    counts[: a.special] = counts.max() + 1  # special tokens first (end of turn, padding)
    kept = rank(counts)[: a.size]
    inside = torch.zeros(VOCAB, dtype=torch.bool)
    inside[kept] = True
    coverage = inside[top1_tokens(heldout)].float().mean().item() if heldout else None
    record = {
        "kept_token_ids": kept.tolist(),  # ranked, most emitted first: a prefix is a smaller vocabulary
        "size": a.size,
        "counted_positions": len(tokens),
        "counted_shards": [f.name for f in counted],
        "heldout_shards": [f.name for f in heldout],
        "heldout_top1_coverage": coverage,
    }
    (a.out / "draft_vocab.json").write_text(json.dumps(record) + "\n")
    print(f"{a.out / 'draft_vocab.json'}: {a.size} tokens from {len(tokens)} positions; held-out coverage {coverage}")


if __name__ == "__main__":
    main()
