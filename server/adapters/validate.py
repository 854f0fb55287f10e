"""Validate a PEFT LoRA adapter against the served base model before anything is stored.

An adapter is the PEFT format (``server/peft.py``: file names, tensor names, and the one reading
of ``adapter_config.json``); here it is checked against the served model: every tensor must be a
``lora_A: [r, in_features]`` / ``lora_B: [out_features, r]`` pair of a decoder-layer projection that
the config's ``target_modules`` selects (PEFT's matching rule), with shapes that fit the base.

Every check raises :class:`AdapterInvalid` with a message that names the
problem and the limit; nothing here writes to disk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from server.errors import BadRequest
from server.peft import (
    CONFIG_FILE,
    EMBEDDING_MODULES,
    PROJECTIONS,
    WEIGHTS_FILE,
    LoraConfig,
    PeftConfigError,
    module_path,
    parse_layer_module,
    parse_tensor_name,
    read_lora_config,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
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


def parse_config(raw: bytes, max_rank: int, model: str = "base model") -> LoraConfig:
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
    try:
        lora = read_lora_config(cfg)
    except PeftConfigError as exc:
        raise AdapterInvalid(f"{CONFIG_FILE}: {exc}") from None
    if lora.r > max_rank:
        raise AdapterInvalid(f"rank {lora.r} is greater than the server's max_lora_rank {max_rank}")
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
    return lora


def check_targets(lora: LoraConfig, base: BaseShape, model: str = "base model") -> tuple[str, ...]:
    """The projections ``lora.target_modules`` selects in ``base`` (PEFT's matching rule), sorted.

    Raises:
        AdapterInvalid: it selects an embedding or output layer, a list entry matches no module of
            ``base``, or nothing is selected at all; the message lists the allowed module names.
    """
    allowed = ", ".join(PROJECTIONS)
    embed = [m.rsplit(".", 1)[-1] for m in EMBEDDING_MODULES if lora.targets(m)]
    if embed:
        raise AdapterInvalid(f"LoRA on embedding/output layers ({', '.join(embed)}) is not supported")
    paths = [module_path(i, n) for i in range(base.num_layers) for n in PROJECTIONS]
    entries = lora.target_modules if isinstance(lora.target_modules, tuple) else ()
    unknown = [
        e
        for e in entries
        if not any(
            replace(lora, target_modules=(e,), exclude_modules=None, layers_to_transform=None).targets(p) for p in paths
        )
    ]
    if unknown:
        raise AdapterInvalid(
            f"target modules {', '.join(unknown)} do not exist in the {model}; allowed: {allowed} "
            "(bare, as a dotted suffix such as 'self_attn.q_proj', or one regular expression)"
        )
    selected = lora.targeted_projections(base.num_layers)
    if not selected:
        raise AdapterInvalid(
            f"target_modules {lora.target_modules!r} selects no module of the {model}; allowed: {allowed}"
        )
    return selected


def check_weights(
    path: Path, lora: LoraConfig, base: BaseShape, model: str = "base model", allow_base_mismatch: bool = False
) -> AdapterInfo:
    """Check every tensor of the safetensors file at ``path`` against ``lora`` and ``base``.

    ``model`` names the model ``base`` describes in messages (``"draft model"`` for a draft adapter).
    ``allow_base_mismatch``: serve an adapter whose tensors cover only part of what its config
    targets in ``base`` (:func:`check_covers_base`) on the modules it has.

    Reads only the safetensors header (shapes, dtypes), never executes anything.

    Raises:
        AdapterInvalid: target modules that do not fit (:func:`check_targets`), an unreadable file,
            an unknown tensor name, a layer out of range, a tensor of a module the config does not
            target, a shape that does not fit the base, an A without its B, or (unless
            ``allow_base_mismatch``) tensors for only part of what the config targets in ``base``.
    """
    from safetensors import SafetensorError, safe_open

    check_targets(lora, base, model)
    r = lora.r
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
        tensor = parse_tensor_name(key)
        layer_module = parse_layer_module(tensor[0]) if tensor else None
        if layer_module is None:
            raise AdapterInvalid(
                f"tensor {key!r} is not a LoRA weight of a decoder layer; expected names like "
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
            )
        (layer, module), ab = layer_module, tensor[1]
        if module not in PROJECTIONS or tensor[0] != module_path(layer, module):
            raise AdapterInvalid(f"tensor {key!r} targets module {module!r}, which the {model} does not have")
        if layer >= base.num_layers:
            raise AdapterInvalid(f"tensor {key!r} is for layer {layer}; the {model} has {base.num_layers} layers")
        if not lora.targets(tensor[0]):
            raise AdapterInvalid(
                f"tensor {key!r} targets {tensor[0]!r}, which is not in target_modules {lora.target_modules!r} "
                "(matched as PEFT does)"
            )
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
    if not allow_base_mismatch:
        check_covers_base(set(seen), lora, base, model)
    return AdapterInfo(
        rank=r,
        alpha=lora.lora_alpha,
        target_modules=tuple(sorted({m for _, m in seen})),
        layers=tuple(sorted({lay for lay, _ in seen})),
        num_tensors=len(keys),
        base_model_name_or_path=lora.base_model_name_or_path,
    )


def check_covers_base(seen: set[tuple[int, str]], lora: LoraConfig, base: BaseShape, model: str = "base model") -> None:
    """Refuse an adapter made for another base: its config targets modules of ``base`` it has no tensors for.

    ``seen``: the ``(layer, projection)`` pairs the weights hold. PEFT saves a tensor pair for every
    module its config selects in the model it was trained on, so an adapter trained on the 4-layer
    draft, uploaded for the 30-layer target, holds layers 0-3 only while its config selects all 30:
    its shapes fit, but it is another model's adapter. Shapes alone cannot tell such bases apart.

    Raises:
        AdapterInvalid: naming the layers held, the layers the config selects in ``base``, the
            adapter's ``base_model_name_or_path``, and the ``allow_base_mismatch`` override.
    """
    wanted = {(i, n) for i in range(base.num_layers) for n in PROJECTIONS if lora.targets(module_path(i, n))}
    missing = wanted - seen
    if not missing:
        return
    held = sorted({layer for layer, _ in seen})
    layers = f"layers {held[0]}-{held[-1]}" if held == list(range(held[0], held[-1] + 1)) else f"layers {held}"
    raise AdapterInvalid(
        f"{WEIGHTS_FILE} adapts {layers} only, but its target_modules {lora.target_modules!r} select "
        f"{len(wanted)} modules in the {base.num_layers} layers of the {model} and {len(missing)} of them have no "
        f"LoRA weights (e.g. {module_path(*min(missing))}): the adapter looks trained for another model "
        f"(base_model_name_or_path {lora.base_model_name_or_path!r}); upload an adapter trained on this "
        "model, or send the form field allow_base_mismatch=true to serve it on the modules it has",
        param="files",
    )
