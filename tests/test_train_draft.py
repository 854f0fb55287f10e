"""The draft distillation loss (training/train_draft.py): bucketed KL and acceptance sum min(p, q) = 1 - TV."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.train_draft import bucket_logq, lk_loss


def test_buckets_hold_the_top_k_and_the_tail_mass():
    logits = torch.randn(5, 50)
    idx = logits.topk(4, -1).indices.int()
    q = bucket_logq(logits, idx).exp()  # [5, 5]
    full = F.softmax(logits, -1)
    assert torch.allclose(q[:, :4], full.gather(-1, idx.long()), atol=1e-6)
    assert torch.allclose(q.sum(-1), torch.ones(5), atol=1e-5)


def test_a_draft_equal_to_the_teacher_is_accepted_always_and_a_different_one_pays_its_tv():
    logits = torch.randn(6, 40)
    idx = logits.topk(8, -1).indices.int()
    logp = bucket_logq(logits, idx)
    loss, stats = lk_loss(logp, logits, idx, tv_weight=1.0)
    assert abs(stats["kl"]) < 1e-5 and abs(stats["accept"] - 1) < 1e-5 and stats["argmax"] == 1.0
    other = torch.randn(6, 40)
    loss, stats = lk_loss(logp, other, idx, tv_weight=1.0)
    p, q = logp.exp(), bucket_logq(other, idx).exp()
    tv = 0.5 * (p - q).abs().sum(-1).mean().item()
    assert abs((1 - stats["accept"]) - tv) < 1e-5
    assert abs(loss.item() - (stats["kl"] + tv)) < 1e-5


def test_sharegpt_questions_keep_short_ones_in_file_order_and_never_a_held_out_prompt(monkeypatch):
    from training import draft_data, teacher_forcing

    exchanges = [("short one", "a"), ("x" * 50, "b"), ("held out", "c"), ("another", "d"), ("last", "e")]
    monkeypatch.setattr(teacher_forcing, "sharegpt_exchanges", lambda: iter(exchanges))
    assert draft_data.sharegpt_questions(3, 20, {"held out"}) == ["short one", "another", "last"]
    assert draft_data.sharegpt_questions(1, 20, set()) == ["short one"]
    assert draft_data.sharegpt_questions(5, 20, set(), fits=lambda q: q != "another") == [
        "short one",
        "held out",
        "last",
    ]


def test_answer_logits_are_the_full_forwards_logits_at_the_answer_positions():
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.train_draft import answer_logits, batches

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    seqs = [([1, 5, 7, 9, 11], 2), ([3, 4, 5], 1), ([8, 8, 2, 6, 6, 6, 1], 4)]
    buckets = [(torch.zeros(len(s) - p, 2, dtype=torch.int32), torch.zeros(len(s) - p, 3)) for s, p in seqs]
    x, rows, cols, _, _ = batches(seqs, buckets, 3, None)
    with torch.no_grad():
        expected = model(x).logits[rows, cols]
        got = answer_logits(model, x, rows, cols)
    assert got.shape == (3 + 2 + 3, 64)
    torch.testing.assert_close(got, expected)
