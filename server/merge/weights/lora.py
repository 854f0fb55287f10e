"""Read a PEFT LoRA adapter and add its delta to base weights.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
section 4.1): a frozen ``W [out, in]`` is adapted as ``h = W x + (alpha / r) B A x``
with ``A [r, in]``, ``B [out, r]``; merging stores ``W' = W + (alpha / r) B A``
so inference pays no LoRA cost per token. PEFT names the factors
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` and keeps ``r``,
``lora_alpha`` (and ``use_rslora``: scale ``alpha / sqrt(r)``) in
``adapter_config.json``. The delta is computed in float32 and added to the
base weight upcast to float32; the caller decides the stored dtype.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from server.errors import BadRequest
from server.peft import CONFIG_FILE, WEIGHTS_FILE, PeftConfigError, parse_tensor_name, read_lora_config


class MergeRefused(BadRequest):
    """400: the adapter cannot be merged as asked (message names the field and value)."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapted linear: ``A [r, in]``, ``B [out, r]`` (float32) and ``scale`` (alpha / r)."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        """``scale * B @ A``: [out, in] float32."""
        return self.scale * (self.b.float() @ self.a.float())


def lora_scale(config: dict) -> float:
    """``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``) from a PEFT config, read by
    :func:`server.peft.read_lora_config` (PEFT's defaults: ``lora_alpha`` 8), as it is served.

    Raises:
        MergeRefused: for per-module ``rank_pattern``/``alpha_pattern``, DoRA,
            ``fan_in_fan_out``, or a config :func:`server.peft.read_lora_config` refuses.
    """
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise MergeRefused(f"adapter_config.json {field}={config[field]!r}: per-module ranks are not merged")
    for field in ("use_dora", "fan_in_fan_out"):
        if config.get(field):
            raise MergeRefused(f"adapter_config.json {field}=true is not supported by merge")
    try:
        return read_lora_config(config).scale
    except PeftConfigError as exc:
        raise MergeRefused(f"adapter_config.json: {exc}") from None


def load_lora(adapter_dir: Path) -> dict[str, LoraFactors]:
    """The adapter in ``adapter_dir`` as ``{base weight name: LoraFactors}``.

    Base weight names are the checkpoint's, e.g. ``model.layers.0.self_attn.q_proj.weight``.

    Raises:
        MergeRefused: a tensor name outside PEFT's LoRA pattern, an A without its B
            (or the reverse), a rank that is not ``r``, or an unsupported config field.
        FileNotFoundError: if either PEFT file is missing.
    """
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    scale = lora_scale(config)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(adapter_dir / WEIGHTS_FILE).items():
        parsed = parse_tensor_name(key)
        if parsed is None:
            raise MergeRefused(f"adapter tensor {key!r} is not a LoRA factor (lora_A/lora_B)")
        halves.setdefault(parsed[0] + ".weight", {})[parsed[1]] = tensor
    factors = {}
    for name, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise MergeRefused(f"adapter module {name!r} has lora_{''.join(pair)} without its pair")
        a, b = pair["A"].float(), pair["B"].float()  # [r, in], [out, r]
        if a.shape[0] != config["r"] or b.shape[1] != config["r"]:
            raise MergeRefused(f"adapter module {name!r}: rank {a.shape[0]}/{b.shape[1]} is not r={config['r']}")
        factors[name] = LoraFactors(a=a, b=b, scale=scale)
    return factors


def merge_lora(
    base: dict[str, torch.Tensor], lora: dict[str, LoraFactors], dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    """``base`` with ``W' = W + scale * B A`` on every adapted weight, each cast to ``dtype``.

    Unadapted tensors are cast to ``dtype`` too (a no-op for a bf16 checkpoint), so
    a zero adapter (B = 0) gives ``base`` bit for bit when ``base`` is already ``dtype``.
    ``base`` is not modified.

    Raises:
        MergeRefused: if the adapter names a weight the base lacks or whose shape
            [out, in] differs from ``B A``'s.
    """
    merged = {}
    for name in lora:
        if name not in base:
            raise MergeRefused(f"adapter targets {name!r}, which the base model does not have")
    for name, w in base.items():
        if name not in lora:
            merged[name] = w.to(dtype)
            continue
        d = lora[name].delta()  # [out, in] float32
        if d.shape != w.shape:
            raise MergeRefused(f"adapter delta for {name!r} is {tuple(d.shape)}, base weight is {tuple(w.shape)}")
        # where the delta is exactly 0 keep W itself: W + 0.0 would turn a -0.0 into +0.0
        merged[name] = torch.where(d == 0, w.float(), w.float() + d).to(dtype)
    return merged


def write_zero_adapter(src: Path, dest: Path) -> Path:
    """Write to ``dest`` (created) a copy of the PEFT adapter in ``src`` (config and factors, no draft
    adapter) with every ``B`` zero: its delta ``(alpha / r) B A`` is exactly 0, so merging it must give
    the base weights bit for bit. Used by the tests and benchmarks that check exactly that.

    Returns ``dest``. Raises OSError if ``src`` lacks ``adapter_config.json`` or
    ``adapter_model.safetensors``.
    """
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    (dest / CONFIG_FILE).write_bytes((src / CONFIG_FILE).read_bytes())
    factors = load_file(src / WEIGHTS_FILE)
    zeroed = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in factors.items()}
    save_file(zeroed, dest / WEIGHTS_FILE)
    return dest
