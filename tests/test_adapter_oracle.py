"""Correctness oracle: the server's greedy tokens equal transformers + PEFT with the same base and adapter.

Two comparisons per shipped adapter, 10 held-out prompts x 16 tokens each:
- unquantized base: a server with ``--quantization none --dtype float32``
  against PEFT on the float32 checkpoint;
- NF4 base: the default server (NF4, bf16 compute) against PEFT on a
  bitsandbytes 4-bit NF4 base (double quant, bf16 compute), as a QLoRA user loads it.
"""

from __future__ import annotations

import httpx
import pytest
import torch

from server.process import REPO_ROOT
from tests.conftest import ADAPTERS, launch

pytestmark = pytest.mark.engine
TOKENS = 16


def server_tokens(base_url: str, model: str, prompts: list[str]) -> list[list[int]]:
    out = []
    for prompt in prompts:
        r = httpx.post(
            base_url + "/v1/completions",
            json={"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0, "return_token_ids": True},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["token_ids"])
    return out


def peft_tokens(adapter: str, prompts: list[str], nf4: bool) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    target = REPO_ROOT / "models/target"
    tok = AutoTokenizer.from_pretrained(target)
    if nf4:
        q = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        base = AutoModelForCausalLM.from_pretrained(
            target, quantization_config=q, device_map="cpu", dtype=torch.bfloat16
        )
    else:
        base = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, REPO_ROOT / "adapters" / adapter).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").input_ids  # [1, P], BOS first as the server does
            gen = model.generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
            out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.fixture(scope="module")
def fp32_url():
    proc = launch("oracle-fp32", "--quantization", "none", "--dtype", "float32")
    yield proc.base_url
    proc.stop()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_unquantized_base_matches_peft(fp32_url, prompts, adapter):
    ours = server_tokens(fp32_url, adapter, prompts[:10])
    assert ours == peft_tokens(adapter, prompts[:10], nf4=False)


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_nf4_base_matches_peft_on_bitsandbytes_4bit(base_url, prompts, adapter):
    ours = server_tokens(base_url, adapter, prompts[:10])
    assert ours == peft_tokens(adapter, prompts[:10], nf4=True)
