"""Every ``target_modules`` form PEFT saves serves the same tensors identically; a config without
``lora_alpha`` is served and merged at PEFT's default scale (real server, real engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.merge.weights.lora import lora_scale
from server.peft import CONFIG_FILE, WEIGHTS_FILE
from testing.process import REPO_ROOT
from tests.conftest import MODEL
from tests.test_adapters_api import complete, upload

pytestmark = pytest.mark.engine

SHIPPED = REPO_ROOT / "adapters/demo" / "stdlib-docs"  # the far-domain adapter: its effect on output is large


def _variant(tmp_path: Path, name: str, **config) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    cfg = {**json.loads((SHIPPED / CONFIG_FILE).read_text()), **config}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (folder / CONFIG_FILE).write_text(json.dumps(cfg))
    (folder / WEIGHTS_FILE).write_bytes((SHIPPED / WEIGHTS_FILE).read_bytes())
    return folder


def test_names_dotted_paths_and_a_regex_serve_identical_output(base_url, tmp_path, prompts):
    modules = json.loads((SHIPPED / CONFIG_FILE).read_text())["target_modules"]
    sublayer = {m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp" for m in modules}
    forms = {
        "form-names": modules,
        "form-dotted": [f"{sublayer[m]}.{m}" for m in modules],
        "form-regex": rf".*\.({'|'.join(modules)})$",
    }
    for name, targets in forms.items():
        r = upload(base_url, name, _variant(tmp_path, name, target_modules=targets))
        assert r.status_code == 201, r.text
        assert sorted(r.json()["target_modules"]) == sorted(modules)
    for prompt in prompts[:3]:
        outputs = {name: complete(base_url, name, prompt, 24) for name in forms}
        assert len(set(outputs.values())) == 1, outputs
        assert outputs["form-names"] != complete(base_url, MODEL, prompt, 24)  # the adapter is really applied


def test_a_config_without_lora_alpha_serves_at_peft_default_scale(base_url, tmp_path, prompts):
    cfg = json.loads((SHIPPED / CONFIG_FILE).read_text())
    # the same delta two ways: alpha omitted (PEFT: 8) and alpha written out as 8
    r = upload(base_url, "alpha-absent", _variant(tmp_path, "absent", lora_alpha=None))
    assert r.status_code == 201, r.text
    assert r.json()["alpha"] == 8.0
    assert upload(base_url, "alpha-8", _variant(tmp_path, "eight", lora_alpha=8)).status_code == 201
    assert lora_scale({k: v for k, v in cfg.items() if k != "lora_alpha"}) == 8 / cfg["r"]  # merged at that scale too
    for prompt in prompts[:2]:
        assert complete(base_url, "alpha-absent", prompt, 24) == complete(base_url, "alpha-8", prompt, 24)
