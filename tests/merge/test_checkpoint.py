"""A merged checkpoint folder loads in transformers and computes what PEFT computes on the same base."""

from __future__ import annotations

import json

import pytest
import torch

from server.merge.weights.checkpoint import merge_model, read_state
from server.merge.weights.nf4 import base_weights
from server.precision import Precision
from testing.process import REPO_ROOT

TARGET = REPO_ROOT / "models/target"


def len_header(folder) -> int:
    """Bytes of the safetensors JSON header (the rest of the file is the bf16 tensor data)."""
    with open(folder / "model.safetensors", "rb") as f:
        return int.from_bytes(f.read(8), "little")


def peft_logits(adapter: str, merge_base: Precision, ids: torch.Tensor) -> torch.Tensor:
    """PEFT's own LoRA forward on the chosen base (fp32 compute): logits [1, S, V]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32)
    weights = base_weights(read_state(TARGET), merge_base)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    model = PeftModel.from_pretrained(model, REPO_ROOT / "adapters/demo" / adapter).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("merge_base", list(Precision))
def test_merged_folder_matches_peft_on_the_same_base(tmp_path, merge_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = merge_model(TARGET, REPO_ROOT / "adapters/demo/austen", tmp_path / "merged", base=merge_base)
    manifest = json.loads((out / "merged_weights.json").read_text())
    assert manifest["merge_base"] == merge_base.value and manifest["serve"] == "bf16"
    assert manifest["served_weight_bytes"] == (out / "model.safetensors").stat().st_size - 8 - len_header(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(ids).logits  # [1, S, V]
    ref = peft_logits("austen", merge_base, ids)
    # the only difference is rounding W + delta to bf16 once (relative 2^-9 per weight)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert (got - ref).abs().max() < 0.05, float((got - ref).abs().max())


def test_merged_folder_before_bf16_rounding_matches_peft_tightly(tmp_path):
    """Without the bf16 store the merge is PEFT's forward up to float32 reassociation."""
    from transformers import AutoModelForCausalLM

    from server.merge.weights.lora import load_lora, merge_lora

    weights = base_weights(read_state(TARGET), Precision.NF4)
    merged = merge_lora(weights, load_lora(REPO_ROOT / "adapters/demo/austen"), dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32)
    model.load_state_dict(merged, strict=False)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 200, 300]])
    with torch.no_grad():
        got = model.eval()(ids).logits
    torch.testing.assert_close(got, peft_logits("austen", Precision.NF4, ids), rtol=1e-4, atol=1e-4)


def test_a_failed_merge_leaves_nothing(tmp_path):
    class Cancelled(Exception):
        pass

    calls = []

    def cancel_at_second_step():
        calls.append(1)
        if len(calls) == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        merge_model(TARGET, REPO_ROOT / "adapters/demo/austen", tmp_path / "m", check=cancel_at_second_step)
    assert list(tmp_path.iterdir()) == []


def test_a_write_failure_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        merge_model(TARGET, REPO_ROOT / "adapters/demo/austen", tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_zero_adapter_folder_merges_into_a_bit_identical_checkpoint(tmp_path):
    """A PEFT adapter with B = 0 (PEFT's own initialisation) merged into bf16 gives the base's tensors bit for bit."""
    from safetensors.torch import save_file

    from server.merge.weights.nf4 import is_quantized

    zero = tmp_path / "zero"
    zero.mkdir()
    cfg = json.loads((REPO_ROOT / "adapters/demo/austen/adapter_config.json").read_text())
    (zero / "adapter_config.json").write_text(json.dumps(cfg))
    state = read_state(TARGET)
    factors = {}
    for k, w in state.items():
        if is_quantized(k):
            module = "base_model.model." + k.removesuffix(".weight")
            factors[module + ".lora_A.weight"] = torch.randn(cfg["r"], w.shape[1])
            factors[module + ".lora_B.weight"] = torch.zeros(w.shape[0], cfg["r"])
    save_file(factors, zero / "adapter_model.safetensors")
    for merge_base in Precision:
        out = merge_model(TARGET, zero, tmp_path / f"merged-{merge_base.value}", base=merge_base)
        merged, expected = read_state(out), base_weights(state, merge_base)
        assert merged.keys() == expected.keys()
        assert all(merged[k].view(torch.int16).equal(expected[k].view(torch.int16)) for k in merged)
