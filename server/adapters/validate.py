"""Validate a PEFT LoRA adapter against the served base model before anything is stored.

An adapter is the PEFT format: ``adapter_config.json`` (a ``LoraConfig``) and
``adapter_model.safetensors`` whose tensors are named
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_{A|B}.weight``
with ``lora_A: [r, in_features]`` and ``lora_B: [out_features, r]`` (Hu et al.
2021, "LoRA", section 4: W' = W + (alpha / r) B A).

Every check raises :class:`AdapterInvalid` with a message that names the
problem and the limit; nothing here writes to disk.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from server.errors import BadRequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DRAFT_DIR = "draft"  # the paired draft adapter's subfolder, as in adapters/<name>/draft/
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SUPPORTED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "wpe")
KEY_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])\.weight$")
MAX_CONFIG_BYTES = 64 * 1024


class AdapterInvalid(BadRequest):
    """400: the uploaded adapter cannot be served on this base model (message says why)."""


@dataclass(frozen=True)
class BaseShape:
    """The base model dimensions an adapter must fit (from its ``config.json``)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict) -> BaseShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        )

    def io(self, module: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of ``module`` in one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }[module]


@dataclass(frozen=True)
class AdapterInfo:
    """What validation learned: rank ``r``, ``alpha``, target modules, layers touched, weight bytes."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]
    num_tensors: int
    base_model_name_or_path: str | None


def check_name(name: str, base_name: str) -> str:
    """Return ``name`` if it is a safe adapter name distinct from the base model's.

    Raises:
        AdapterInvalid: naming the allowed alphabet and length.
    """
    if not NAME_RE.match(name or "") or ".." in name:
        raise AdapterInvalid(
            f"adapter name {name!r} is not allowed: use 1-64 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'",
            param="name",
        )
    if name == base_name:
        raise AdapterInvalid(f"adapter name {name!r} is the base model's name; choose another", param="name")
    return name


def check_files(names: list[str]) -> None:
    """Refuse pickle weights and require exactly the two PEFT files.

    Raises:
        AdapterInvalid: listing what was found and what is allowed.
    """
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise AdapterInvalid(
            f"pickle weight files are refused ({', '.join(pickles)}): they can run code when loaded; "
            f"upload {WEIGHTS_FILE} (safetensors) instead",
            param="files",
        )
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if f not in names]
    if missing:
        raise AdapterInvalid(
            f"missing {', '.join(missing)}; an adapter upload needs {CONFIG_FILE} and {WEIGHTS_FILE} "
            f"(got {', '.join(sorted(names)) or 'no files'})",
            param="files",
        )


def parse_config(raw: bytes, max_rank: int, model: str = "base model") -> dict:
    """Parse and check ``adapter_config.json``; ``model`` names the model it is for in messages.

    Raises:
        AdapterInvalid: not JSON, not LoRA, rank above ``max_rank``, or an unsupported PEFT feature.
    """
    if len(raw) > MAX_CONFIG_BYTES:
        raise AdapterInvalid(f"{CONFIG_FILE} is {len(raw)} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        cfg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterInvalid(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise AdapterInvalid(f"{CONFIG_FILE} must be a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterInvalid(f"peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters are served")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterInvalid(f"'r' (rank) must be a positive integer, got {r!r}")
    if r > max_rank:
        raise AdapterInvalid(f"rank {r} is greater than the server's max_lora_rank {max_rank}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterInvalid(f"'lora_alpha' must be a positive number, got {alpha!r}")
    if cfg.get("use_dora"):
        raise AdapterInvalid("DoRA adapters (use_dora: true) are not supported by the engine; train plain LoRA")
    if cfg.get("modules_to_save"):
        raise AdapterInvalid(
            f"modules_to_save {cfg['modules_to_save']} is not supported: the engine serves only the LoRA "
            "deltas, not fully trained copies of modules"
        )
    if cfg.get("bias", "none") != "none":
        raise AdapterInvalid(f"bias {cfg['bias']!r} is not supported; only bias 'none'")
    if cfg.get("lora_bias"):
        raise AdapterInvalid("lora_bias: true is not supported by the engine; train with lora_bias false")
    for key in ("alpha_pattern", "rank_pattern"):
        if cfg.get(key):
            raise AdapterInvalid(f"'{key}' (per-module rank/alpha) is not supported; use one r and lora_alpha")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        raise AdapterInvalid(
            f"target_modules as a regular expression ({targets!r}) is not supported; list module names "
            f"from {', '.join(SUPPORTED_MODULES)}"
        )
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise AdapterInvalid(f"target_modules must be a non-empty list of names from {', '.join(SUPPORTED_MODULES)}")
    embed = sorted(set(targets) & set(EMBEDDING_MODULES))
    if embed:
        raise AdapterInvalid(f"LoRA on embedding/output layers ({', '.join(embed)}) is not supported")
    unknown = sorted(set(targets) - set(SUPPORTED_MODULES))
    if unknown:
        raise AdapterInvalid(
            f"target modules {', '.join(unknown)} do not exist in the {model}; allowed: {', '.join(SUPPORTED_MODULES)}"
        )
    return cfg


def check_weights(path: Path, cfg: dict, base: BaseShape, model: str = "base model") -> AdapterInfo:
    """Check every tensor of the safetensors file at ``path`` against ``cfg`` and ``base``.

    ``model`` names the model ``base`` describes in messages (``"draft model"`` for a draft adapter).

    Reads only the safetensors header (shapes, dtypes), never executes anything.

    Raises:
        AdapterInvalid: unreadable file, unknown tensor name, layer out of range,
            shape that does not fit the base, or an A without its B.
    """
    from safetensors import SafetensorError, safe_open

    r = cfg["r"]
    targets = set(cfg["target_modules"])
    seen: dict[tuple[int, str], set[str]] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterInvalid(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None
    if not keys:
        raise AdapterInvalid(f"{WEIGHTS_FILE} holds no tensors")
    for key in keys:
        m = KEY_RE.match(key)
        if m is None:
            raise AdapterInvalid(
                f"tensor {key!r} is not a LoRA weight of a decoder layer; expected names like "
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
            )
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if module not in SUPPORTED_MODULES:
            raise AdapterInvalid(f"tensor {key!r} targets module {module!r}, which the {model} does not have")
        if module not in targets:
            raise AdapterInvalid(f"tensor {key!r} targets {module!r}, which is not in target_modules {sorted(targets)}")
        if layer >= base.num_layers:
            raise AdapterInvalid(f"tensor {key!r} is for layer {layer}; the {model} has {base.num_layers} layers")
        if dtypes[key] not in ("F16", "BF16", "F32"):
            raise AdapterInvalid(f"tensor {key!r} has dtype {dtypes[key]}; allowed: F16, BF16, F32")
        fan_in, fan_out = base.io(module)
        want = (r, fan_in) if ab == "A" else (fan_out, r)
        if shapes[key] != want:
            raise AdapterInvalid(
                f"tensor {key!r} has shape {list(shapes[key])}; the {model} (hidden_size {base.hidden_size}, "
                f"intermediate_size {base.intermediate_size}) with r={r} needs {list(want)}"
            )
        seen.setdefault((layer, module), set()).add(ab)
    unpaired = sorted(f"layer {lay} {mod}" for (lay, mod), ab in seen.items() if ab != {"A", "B"})
    if unpaired:
        raise AdapterInvalid(f"lora_A and lora_B must come in pairs; unpaired: {', '.join(unpaired[:5])}")
    return AdapterInfo(
        rank=r,
        alpha=float(cfg.get("lora_alpha", 8)),
        target_modules=tuple(sorted({m for _, m in seen})),
        layers=tuple(sorted({lay for lay, _ in seen})),
        num_tensors=len(keys),
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )
