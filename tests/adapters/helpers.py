"""Build PEFT-format adapter files for tests (shapes of a given base, random weights)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from server.adapters.validate import BaseShape

SHAPE = BaseShape(hidden_size=384, intermediate_size=1024, num_layers=6, num_heads=6, num_kv_heads=6, head_dim=64)
# models/draft's shape: paired draft adapters must fit it.
DRAFT_SHAPE = BaseShape(hidden_size=192, intermediate_size=512, num_layers=3, num_heads=3, num_kv_heads=3, head_dim=64)


def adapter_config(r: int = 8, modules=("q_proj", "v_proj"), **extra) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(modules), "bias": "none", **extra}


def adapter_tensors(r: int = 8, modules=("q_proj", "v_proj"), shape: BaseShape = SHAPE, layers=None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(shape.num_layers) if layers is None else layers:
        for m in modules:
            fan_in, fan_out = shape.io(m)
            kind = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{kind}.{m}"
            out[f"{key}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.01
            out[f"{key}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.01
    return out


def write_adapter(
    folder: Path, r: int = 8, modules=("q_proj", "v_proj"), config: dict | None = None, tensors=None
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config or adapter_config(r, modules)))
    save_file(
        tensors if tensors is not None else adapter_tensors(r, modules), str(folder / "adapter_model.safetensors")
    )
    return folder


def adapter_bytes(
    r: int = 8, modules=("q_proj", "v_proj"), config: dict | None = None, tensors=None, shape: BaseShape = SHAPE
) -> dict[str, bytes]:
    return {
        "adapter_config.json": json.dumps(config or adapter_config(r, modules)).encode(),
        "adapter_model.safetensors": save(tensors if tensors is not None else adapter_tensors(r, modules, shape)),
    }


def tar_gz(files: dict[str, bytes], prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()
