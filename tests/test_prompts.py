"""The prompt sets stored in the repository (prompts/): the held-out prompts every benchmark recorded, and the instruct sets."""

from __future__ import annotations

import hashlib
import json

import pytest

import prompts

# sha256 of json.dumps(prompts.cut_heldout_prompts(training.corpus.load_splits(<the full corpora>), 64)), measured when
# prompts/heldout/ was extracted: the stored texts must keep giving exactly the prompts benchmarks recorded.
HELDOUT_64_SHA256 = "c27165ecbc0fbff2c66f2164c2b5adb1e08b135e22db6281c73b3c0f13a9504c"


def test_heldout_prompts_are_the_ones_recorded_and_prefixes_of_each_other():
    p64 = prompts.heldout_prompts(64)
    assert hashlib.sha256(json.dumps(p64).encode()).hexdigest() == HELDOUT_64_SHA256
    assert prompts.heldout_prompts(24) == p64[:24]
    assert all(len(p.split()) == 12 for p in p64)
    assert [len(w) for w in prompts.corpus_words()] == [len(s.heldout.split()) for s in prompts.heldout_splits()]


def test_instruct_prompt_sets_are_distinct_non_empty_lines():
    for domain, count in (("chat", 64), ("python-docs", 32), ("style", 32)):
        lines = prompts.domain_prompts(domain)
        assert len(lines) == count and len(set(lines)) == count
        assert all(line.strip() == line and line for line in lines)
    assert prompts.chat_prompts(3) == prompts.domain_prompts("chat")[:3]
    with pytest.raises(ValueError, match="holds 64 prompts, asked for 65"):
        prompts.chat_prompts(65)
    with pytest.raises(ValueError, match="unknown prompt domain"):
        prompts.domain_prompts("poetry")


def test_each_shipped_adapter_gets_its_own_domain_and_the_base_the_chat_set():
    assert prompts.adapter_prompts(None) == prompts.domain_prompts("chat")
    assert prompts.adapter_prompts("stdlib-docs") == prompts.domain_prompts("python-docs")
    assert prompts.adapter_prompts("austen", 3) == prompts.domain_prompts("style", 3)
    assert prompts.adapter_prompts("zipf-7") == prompts.domain_prompts("chat")  # any other name: chat
    style = prompts.domain_prompts("style")
    assert prompts.adapter_prompts("austen", 34) == style + style[:2]  # past the 32 stored: starts over


def test_pair_prompts_are_chat_sets_for_smollm2_and_held_out_text_for_demo():
    assert prompts.CHAT_PAIRS == ("smollm2",)
    assert prompts.pair_prompts("smollm2", None, 4) == prompts.chat_prompts(4)
    assert prompts.pair_prompts("smollm2", "stdlib-docs", 4) == prompts.domain_prompts("python-docs", 4)
    for adapter in (None, "austen", "stdlib-docs"):
        assert prompts.pair_prompts("demo", adapter, 5) == prompts.heldout_prompts(5)
