"""More adapters than LoRA slots: base and adapter requests in one busy batch get their solo outputs.

With ``max_loras`` (4) slots full, vLLM 0.32's CPU LoRA ops computed every base request
batched with an adapter request with the last slot's adapter (index -1 wrapped around;
server/engine/vllm_patches/cpu_lora_index.py). Seen without the patch: 8 of 8 greedy base
outputs changed in such a batch, with and without speculation.
"""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from testing.process import REPO_ROOT
from tests.conftest import ADAPTERS, MODEL, launch

pytestmark = pytest.mark.engine
EXTRA = [f"copy{i}" for i in range(5)]  # 2 shipped + 5 copies = 7 adapters over 4 slots


@pytest.fixture(scope="module")
def url():
    proc = launch("lora-slots")
    for i, name in enumerate(EXTRA):
        src = REPO_ROOT / "adapters/demo" / ADAPTERS[i % 2]
        files = [("files", (f, (src / f).read_bytes())) for f in ("adapter_config.json", "adapter_model.safetensors")]
        r = httpx.post(proc.base_url + "/v1/adapters", data={"name": name}, files=files, timeout=120)
        assert r.status_code == 201, r.text
    yield proc.base_url
    proc.stop()


def _text(url: str, body: dict) -> str:
    r = httpx.post(url + "/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_requests_in_a_batch_over_full_lora_slots_get_their_solo_output(url, prompts):
    models = [MODEL, *ADAPTERS, *EXTRA]
    bodies = [
        {"model": models[i % len(models)], "prompt": prompts[i], "max_tokens": 24, "temperature": 0, "ignore_eos": True}
        for i in range(2 * len(models))
    ]
    solo = [_text(url, b) for b in bodies]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        batched = list(pool.map(lambda b: _text(url, b), bodies))
    wrong = [(b["model"], s, t) for b, s, t in zip(bodies, solo, batched, strict=True) if s != t]
    assert not wrong, wrong
