"""Draft-adapter distillation (training/train_draft_adapter.py) and its prompts (training/chat_prompts.py)."""

from __future__ import annotations

import argparse
import io
import json

import pytest
import torch

import prompts
from training.chat_prompts import domain_training_prompts
from training.draft_data import lora_engine_args
from training.train_draft import bucket_logq
from training.train_draft_adapter import card, train


@pytest.mark.parametrize("domain, held", [("python-docs", "python-docs"), ("style", "style")])
def test_domain_training_prompts_are_fixed_and_never_an_evaluation_prompt(domain, held):
    got = domain_training_prompts(domain)
    assert got == domain_training_prompts(domain) and len(got) > 400 and len(set(got)) == len(got)
    assert not set(got) & set(prompts.domain_prompts(held))
    with pytest.raises(ValueError, match="allowed: 'python-docs', 'style'"):
        domain_training_prompts("chat")


def test_lora_engine_args_serve_the_adapters_rank(tmp_path):
    assert lora_engine_args(None) == {}
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 16}))
    assert lora_engine_args(tmp_path) == {"enable_lora": True, "max_loras": 1, "max_lora_rank": 16}


def tiny_peft_llama():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, tie_word_embeddings=True)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    return get_peft_model(LlamaForCausalLM(config), lora)


def shifted_teacher_answers(model, n: int, length: int, topk: int = 8):
    """Answers whose teacher is ``model`` with a random LoRA delta (a target adapter's shift, which the
    draft's LoRA can represent): (seqs, buckets) as load_answers returns. Leaves ``model``'s LoRA at zero."""
    gen = torch.Generator().manual_seed(1)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in lora_b:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        seqs, buckets = [], []
        for _ in range(n):
            ids = torch.randint(0, 64, (length,), generator=gen).tolist()
            plen = 4
            logits = model(torch.tensor([ids])).logits[0, plen - 1 : -1]  # [T, V]: predicts positions plen..
            idx = logits.topk(topk, -1).indices.int()
            seqs.append((ids, plen))
            buckets.append((idx, bucket_logq(logits, idx)))
        for p in lora_b:
            p.zero_()
    return seqs, buckets


def test_training_moves_only_the_lora_and_raises_held_out_acceptance(tmp_path):
    from training.train_draft import evaluate

    model = tiny_peft_llama()
    data = shifted_teacher_answers(model, 16, 20)
    heldout = shifted_teacher_answers(tiny_peft_llama(), 8, 20)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    args = argparse.Namespace(run=tmp_path, steps=60, batch=8, lr=0.01, tv_weight=1.0, eval_every=30)
    before = evaluate(model, *heldout, 1.0)
    log = io.StringIO()
    after = train(model, data, heldout, args, log)
    # The tiny model's logits are near uniform (acceptance ~0.98 already): agreement and KL show the fit.
    assert after["argmax"] > before["argmax"] + 0.2 and after["kl"] < before["kl"] / 4, (before, after)
    assert after["accept"] > before["accept"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert (tmp_path / "lora-checkpoint.pt").is_file() and len(log.getvalue().splitlines()) == 60
    # Resuming at the last step trains no further and returns the checkpoint's evaluation.
    assert train(tiny_peft_llama(), data, heldout, args, io.StringIO()) == after


def test_card_reports_before_and_after():
    report = {
        "adapter": "stdlib-docs", "domain": "python-docs", "draft": "models/smollm2-135m-draft", "rank": 8,
        "alpha": 16.0, "target_modules": ["q_proj"], "layers": 4, "trainable_parameters": 1234,
        "train_answers": 400, "train_tokens": 40000, "heldout_answers": 32, "tv_weight": 1.0, "steps": 300,
        "batch": 8, "lr": 0.001, "train_seconds": 600.0, "command": "python -m training.train_draft_adapter ...",
        "heldout_before": {"argmax": 0.31, "accept": 0.3, "kl": 2.5},
        "heldout_after": {"argmax": 0.45, "accept": 0.42, "kl": 1.5},
    }  # fmt: skip
    text = card(report)
    assert "| greedy agreement (draft argmax = target's) | 0.310 | 0.450 |" in text
    assert "`prompts/python_docs.txt` (32)" in text and "stdlib-docs/draft" in text
