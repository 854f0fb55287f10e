"""The PEFT LoRA adapter format: file names, tensor names, and the one reading of ``adapter_config.json``.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` (a ``peft.LoraConfig``) and
``adapter_model.safetensors`` whose tensors are named
``base_model.model.<module path>.lora_{A|B}.weight``, e.g.
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``, with ``lora_A: [r, in_features]``
and ``lora_B: [out_features, r]``. The adapted layer computes ``h = W x + scale * B A x`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA) (Hu et al. 2021, "LoRA", section 4.1;
Kalajdzievski 2023, "rsLoRA").

Validation (``server/adapters/validate.py``), merging (``server/merge/weights/lora.py``), the benchmarks and
the training scripts all read a config through :func:`read_lora_config`, so an adapter is served and
merged at the same scale. Defaults are PEFT's own (``LoraConfig``: ``lora_alpha`` 8), and which
modules an adapter targets is decided by PEFT's own matcher (``check_target_module_exists``: a string
is a regular expression that must match a module path in full; a list entry matches a module path
that equals it or ends with ``.<entry>``; ``exclude_modules``, ``layers_to_transform``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DRAFT_DIR = "draft"  # a paired draft adapter's subfolder, as in adapters/<name>/draft/

# The seven linear projections of a Llama decoder layer, by the sublayer that holds them.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
EMBEDDING_MODULES = ("model.embed_tokens", "lm_head")

DEFAULT_LORA_ALPHA = 8  # peft.LoraConfig.lora_alpha's default
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output layer

TENSOR_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight$")
LAYER_MODULE_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<sublayer>self_attn|mlp)\.(?P<name>[a-z_]+)$")


class PeftConfigError(ValueError):
    """``adapter_config.json`` is not a LoRA config this server can read; the message names the field."""


def module_path(layer: int, name: str) -> str:
    """The module path of projection ``name`` in decoder ``layer``, e.g. ``model.layers.3.mlp.up_proj``."""
    return f"model.layers.{layer}.{'self_attn' if name in ATTENTION_PROJECTIONS else 'mlp'}.{name}"


def parse_tensor_name(key: str) -> tuple[str, str] | None:
    """``(module path, "A" | "B")`` of a PEFT LoRA tensor name, or None if ``key`` is not one."""
    m = TENSOR_RE.match(key)
    return (m["module"], m["which"]) if m else None


def parse_layer_module(path: str) -> tuple[int, str] | None:
    """``(layer index, projection name)`` of a decoder-layer module path, or None for any other path."""
    m = LAYER_MODULE_RE.match(path)
    return (int(m["layer"]), m["name"]) if m else None


@dataclass(frozen=True)
class LoraConfig:
    """The fields of a PEFT LoRA config that decide what an adapter computes.

    ``target_modules`` is kept as written (a list of names or dotted suffixes, or one regular
    expression); :meth:`targets` answers whether a module path is adapted, by PEFT's rule.
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    exclude_modules: tuple[str, ...] | str | None
    layers_to_transform: tuple[int, ...] | None
    base_model_name_or_path: str | None = None

    @property
    def scale(self) -> float:
        """``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rsLoRA (dimensionless)."""
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def targets(self, path: str) -> bool:
        """Whether PEFT would adapt the module at ``path`` (e.g. ``model.layers.0.self_attn.q_proj``)."""
        from peft.tuners.tuners_utils import check_target_module_exists

        if self.target_modules == ALL_LINEAR:
            return parse_layer_module(path) is not None
        config = SimpleNamespace(
            target_modules=list(self.target_modules) if isinstance(self.target_modules, tuple) else self.target_modules,
            exclude_modules=list(self.exclude_modules)
            if isinstance(self.exclude_modules, tuple)
            else self.exclude_modules,
            layers_to_transform=list(self.layers_to_transform) if self.layers_to_transform is not None else None,
            layers_pattern=None,
            modules_to_save=None,
            target_parameters=None,
        )
        return bool(check_target_module_exists(config, path))

    def targeted_projections(self, num_layers: int) -> tuple[str, ...]:
        """The projection names adapted in at least one of ``num_layers`` decoder layers, sorted."""
        return tuple(
            sorted({n for n in PROJECTIONS if any(self.targets(module_path(i, n)) for i in range(num_layers))})
        )


def _names(value, field: str) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PeftConfigError(f"{field} must be a list of module names or one regular expression, got {value!r}")


def read_lora_config(cfg: dict) -> LoraConfig:
    """Read the parsed ``adapter_config.json`` ``cfg`` as PEFT would, with PEFT's defaults.

    Raises:
        PeftConfigError: ``r`` not a positive integer, ``lora_alpha`` not a positive number,
            ``target_modules`` missing, empty or not a list of strings / one string, or a
            ``target_modules`` string that is not a valid regular expression.
    """
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise PeftConfigError(f"'r' (rank) must be a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", DEFAULT_LORA_ALPHA)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or alpha <= 0:
        raise PeftConfigError(f"'lora_alpha' must be a positive number, got {alpha!r}")
    targets = _names(cfg.get("target_modules"), "target_modules")
    if not targets:
        raise PeftConfigError(
            "target_modules must be a non-empty list of module names (e.g. ['q_proj', 'self_attn.v_proj']) "
            f"or one regular expression; allowed modules: {', '.join(PROJECTIONS)}"
        )
    for pattern in [targets] if isinstance(targets, str) else []:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PeftConfigError(f"target_modules {pattern!r} is not a valid regular expression: {exc}") from None
    layers = cfg.get("layers_to_transform")
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise PeftConfigError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
    return LoraConfig(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=targets,
        exclude_modules=_names(cfg.get("exclude_modules"), "exclude_modules"),
        layers_to_transform=tuple(layers) if layers is not None else None,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
    )


def with_peft_defaults(cfg: dict) -> dict:
    """``cfg`` with PEFT's defaults written out for fields vLLM requires (``lora_alpha``).

    vLLM's ``PEFTHelper`` refuses a config without ``lora_alpha`` that PEFT itself loads with
    alpha 8; a stored adapter therefore carries the value PEFT would use.
    """
    return {**cfg, "lora_alpha": cfg.get("lora_alpha", DEFAULT_LORA_ALPHA)}
