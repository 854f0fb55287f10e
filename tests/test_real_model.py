"""The converted SmolLM2-135M-Instruct folder (training/real_model.py): its shapes, and refusal of a bad GGUF (no engine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training.real_model import DEFAULT_OUT, GGUF_NAME, PACKAGE, RealModelError, check_gguf, convert, find_gguf


@pytest.fixture(scope="module")
def folder() -> Path:
    """The folder scripts/install.sh makes (converted here, a few seconds, if it is missing)."""
    return convert(DEFAULT_OUT)


def test_converted_config_has_the_smollm2_135m_shapes(folder: Path):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (9, 3, 64)
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config


def test_converted_folder_has_bf16_weights_and_a_chat_template(folder: Path):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_shape() == [49152, 576] and embed.get_dtype() == "BF16"
    assert "lm_head.weight" not in names  # tied: the loader re-ties it to the embedding
    assert len([n for n in names if n.endswith("self_attn.q_proj.weight")]) == 30
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()


def test_a_corrupted_gguf_is_refused_with_the_fix(tmp_path: Path):
    bad = tmp_path / GGUF_NAME
    shutil.copyfile(find_gguf(), bad)
    with bad.open("r+b") as f:
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(RealModelError, match="bash scripts/install.sh") as err:
        check_gguf(bad)
    assert PACKAGE in str(err.value) and "expected" in str(err.value)
    out = tmp_path / "out"
    with pytest.raises(RealModelError):
        convert(out, gguf=bad)
    assert not out.exists()


def test_a_missing_package_is_named_with_the_fix(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(RealModelError, match=f"{PACKAGE} is not installed.*bash scripts/install.sh"):
        find_gguf()
