"""Server settings: the one place configuration is read (env vars and CLI flags).

Every setting is an environment variable ``QSERVE_<NAME>`` and a CLI flag
``--<name-with-dashes>``; CLI flags win. Values are validated at start-up
with messages that say what to change. Inward code receives the frozen
:class:`Settings` object and never reads the environment itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.pairs import PAIRS, REPO_ROOT
from server.speculation.config import Policy, SpeculationConfig
from server.speculation.cost import CostModel


def _check_model_dir(path: Path, what: str, flag: str) -> Path:
    """Return ``path`` if it is a Hugging Face model folder, else raise ValueError naming ``flag``."""
    if not path.is_dir():
        assembled = path in (PAIRS["smollm2"].target, PAIRS["smollm2"].draft)
        fix = " (or run `bash scripts/install.sh`: it assembles this folder)" if assembled else ""
        raise ValueError(f"{what} folder {path} does not exist; set {flag} to a Hugging Face model folder{fix}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{what} folder {path} has no config.json; set {flag} to a Hugging Face model folder")
    return path


def _check_same_tokenizer(target: Path, draft: Path) -> None:
    """Raise ValueError if both folders have a ``tokenizer.json`` and their vocabularies differ: the target
    verifies the draft's token ids, so the same id must be the same token."""
    t, d = target / "tokenizer.json", draft / "tokenizer.json"
    if not (t.is_file() and d.is_file()):
        return
    vt, vd = (json.loads(f.read_text(encoding="utf-8")).get("model", {}).get("vocab") for f in (t, d))
    if vt != vd:
        differ = sorted(set(vt or {}).symmetric_difference(vd or {}))[:3] if isinstance(vt, dict) else []
        raise ValueError(
            f"the draft's tokenizer ({d}) is not the target's ({t}): token ids map to other tokens"
            f"{' (e.g. ' + ', '.join(map(repr, differ)) + ')' if differ else ''}; use a draft trained "
            "with the target's tokenizer"
        )


class Settings(BaseSettings):
    """All settings of one server process.

    Units: ``port`` TCP port; ``max_model_len`` tokens; ``kv_cache_space_gib``
    GiB of CPU memory for vLLM's KV cache.
    """

    model_config = SettingsConfigDict(
        env_prefix="QSERVE_",
        frozen=True,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="python -m server",
        extra="forbid",
    )

    pair: Literal["smollm2", "demo"] = Field(
        "smollm2",
        description="model pair whose target, served name, draft, adapters, speculation policy, k and step-time "
        "model are the defaults of --model, --served-model-name, --draft-model, --seed-adapters-dir, "
        "--speculation-policy, --num-speculative-tokens and --speculation-cost-ms (server/pairs.py PAIRS)",
    )
    model: Path = Field(description="target model folder (Hugging Face format); default: the pair's")
    served_model_name: str = Field(description="model id clients send in 'model'; default: the pair's")
    draft_model: Path | None = Field(
        description="draft model folder for draft-target speculative decoding; default: the pair's"
    )
    speculation: bool = Field(True, description="draft-target speculative decoding on/off")
    batch_invariant: bool = Field(
        False,
        description="greedy output independent of the batch: a request alone, batched, beside adapters and "
        "under speculation gets the same tokens and logprobs (one-row matmuls take the many-row kernel, "
        "vllm_patches/row_invariant_gemm.py); off by default: 0.95-0.99x tokens/s in its run "
        "(BENCHMARKS.md, 'Exactness')",
    )
    num_speculative_tokens: int = Field(
        ge=1, le=16, description="draft tokens per step (k); the adaptive policy's largest k; default: the pair's"
    )
    speculation_policy: Policy = Field(
        description="fixed: every request drafts num_speculative_tokens each step; adaptive: each request's k "
        "(0..num_speculative_tokens) is chosen per step from its adapter's acceptance and the batch size; "
        "default: the pair's (adaptive for smollm2, fixed for demo)",
    )
    speculation_cost_ms: str = Field(
        description="the adaptive policy's step-time model in ms, 't0,t1,d0,d1[,l0,l1,e0,e1[,v1]]': a target "
        "forward over B requests verifying D drafts costs t0 + t1 B + v1 D (v1 defaults to t1), a draft pass over "
        "x tokens d0 + d1 x, and x_l tokens of adapter requests add l0 + l1 x_l to the target and e0 + e1 x_l to "
        "each draft pass (measure yours: python -m bench.adaptive_spec); default: the pair's"
    )
    speculation_cost_online: bool = Field(
        description="refit the step-time model from the engine's own decode-step times while serving, starting "
        "from --speculation-cost-ms; the policy decides with the latest fit, exported as "
        "qserve_speculation_step_model_ms; default: on with the adaptive policy, off with fixed",
    )
    quantization: Literal["nf4", "none"] = Field(
        "nf4", description="nf4: 4-bit NF4 via bitsandbytes (QLoRA); none: serve the checkpoint dtype"
    )
    draft_quantization: Literal["nf4", "none"] = Field(
        description="how the draft is served beside an NF4 target: nf4 too, or none (its checkpoint dtype; "
        "a small draft is cheaper unquantized on CPUs); default: the pair's (none for smollm2, nf4 for demo)",
    )
    dtype: Literal["bfloat16", "float32"] = Field("bfloat16", description="compute dtype")
    max_model_len: int = Field(1024, ge=16, le=1_048_576, description="context length (tokens)")
    max_num_seqs: int = Field(32, ge=1, le=4096, description="most sequences the engine batches")
    enable_lora: bool = Field(True, description="serve LoRA adapters per request")
    max_loras: int = Field(
        4, ge=2, le=64, description="adapters resident in one batch (>=2: see tests/test_lora_slots.py)"
    )
    max_cpu_loras: int | None = Field(
        None,
        ge=2,
        le=4096,
        description="adapters the engine keeps loaded in memory beyond the batch's slots (an LRU cache; one "
        "outside it is read from the store again); default: max_loras (BENCHMARKS.md, 'Adapter scale')",
    )
    max_lora_rank: int = Field(16, ge=1, le=256, description="largest adapter rank accepted")
    adapter_store_dir: Path = Field(
        REPO_ROOT / "var" / "adapters", description="where uploaded adapters are stored (survives restarts)"
    )
    registry_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL of the adapter registry shared by several replicas (postgresql://user:pw@host/db; "
        "adapter_store_dir then on a volume they share; docs/scaling.md); unset: this server's own store",
    )
    seed_adapters_dir: Path | None = Field(
        description="adapter folders stored and served at start if not stored yet; default: the pair's"
    )
    merged_models_dir: Path = Field(
        REPO_ROOT / "var" / "merged", description="where merged models are stored (survives restarts)"
    )
    max_merged_models: int = Field(
        2, ge=0, le=64, description="merged models served at once, each on its own engine (0: merging off)"
    )
    max_adapter_bytes: int = Field(
        256 * 2**20, ge=1024, description="largest adapter upload, and largest archive expansion (bytes)"
    )
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="devices each layer is split over (docs/scaling.md)")
    pipeline_parallel_size: int = Field(
        1, ge=1, le=64, description="stages the layers are split into (docs/scaling.md)"
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM's executor for parallel engines: mp (one node) or ray (several nodes)"
    )
    kv_cache_space_gib: int = Field(1, ge=1, le=1024, description="CPU KV cache size (GiB)")
    max_adapter_labels: int = Field(
        32, ge=1, le=1000, description="distinct adapter label values in metrics; more are counted as '(other)'"
    )
    seed: int = Field(0, description="engine seed")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # --- hardening: auth (server/api/auth.py), limits (server/api/limits.py), shutdown (server/__main__.py) ---
    api_keys: SecretStr | None = Field(None, description="comma-separated inference API keys (bearer tokens)")
    admin_api_keys: SecretStr | None = Field(
        None, description="comma-separated admin API keys (may also manage adapters)"
    )
    api_keys_file: Path | None = Field(None, description="file of keys, one 'inference KEY' or 'admin KEY' a line")
    open_metrics: bool = Field(True, description="/metrics answers without a key (when keys are set)")
    open_dashboard: bool = Field(True, description="/dashboard answers without a key (when keys are set)")
    max_request_bytes: int = Field(2**20, ge=1024, description="largest JSON request body (bytes)")
    max_n: int = Field(8, ge=1, le=128, description="largest 'n' (choices per request)")
    max_queue: int = Field(64, ge=0, description="generation requests allowed to wait beyond max_num_seqs; past it 429")
    retry_after_s: int = Field(2, ge=1, le=3600, description="Retry-After header of a 429 (seconds)")
    shutdown_grace_s: int = Field(30, ge=0, le=3600, description="on SIGTERM, seconds in-flight requests may finish")
    keep_alive_timeout_s: int = Field(
        65,
        ge=1,
        le=3600,
        description="seconds an idle HTTP/1.1 connection stays open; longer than clients' pools keep one (httpx 5, "
        "aiohttp 15, load balancers 60), so the server never closes a connection a client is reusing",
    )
    exit_on_engine_death: bool = Field(
        True, description="exit non-zero when the engine dies (a supervisor restarts us)"
    )

    @model_validator(mode="before")
    @classmethod
    def _pair_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        name = data.get("pair", cls.model_fields["pair"].default)
        pair = PAIRS.get(name)
        if pair is None:
            return data  # the field's own validation names the allowed pairs
        adaptive = data.get("speculation_policy", pair.speculation_policy) == "adaptive"
        defaults = {
            "model": pair.target,
            "served_model_name": pair.served_model_name,
            "draft_model": pair.draft,
            "seed_adapters_dir": pair.seed_adapters,
            "speculation_policy": pair.speculation_policy,
            "num_speculative_tokens": pair.max_speculative_tokens if adaptive else pair.num_speculative_tokens,
            "speculation_cost_ms": ",".join(f"{x:g}" for x in pair.speculation_cost_ms),
            "speculation_cost_online": adaptive,
            "draft_quantization": pair.draft_quantization,
        }
        return {**defaults, **data}

    @field_validator("speculation_cost_ms")
    @classmethod
    def _cost_is_four_eight_or_nine_numbers(cls, v: str) -> str:
        try:
            values = [float(p) for p in v.split(",")]
            if len(values) not in (4, 8, 9):
                raise ValueError(len(values))
            CostModel(*values)  # the model owns which values it takes (each >= 0, t0 > 0)
        except ValueError:
            raise ValueError(
                f"{v!r} is not 't0,t1,d0,d1', 't0,t1,d0,d1,l0,l1,e0,e1' or 't0,t1,d0,d1,l0,l1,e0,e1,v1': four, eight "
                "or nine numbers >= 0 (ms), t0 > 0, e.g. '86,5.7,15,1.8' or '86,5.7,15,1.8,40,20,5,2,1.5'"
            ) from None
        return v

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_file():
            raise ValueError(f"API keys file {v} does not exist; set QSERVE_API_KEYS_FILE / --api-keys-file to a file")
        return v

    @field_validator("model")
    @classmethod
    def _model_exists(cls, v: Path) -> Path:
        return _check_model_dir(v, "model", "QSERVE_MODEL / --model")

    @field_validator("served_model_name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not v or len(v) > 128 or any(c in v for c in "/\\ \t\n"):
            raise ValueError(f"served model name {v!r} must be 1-128 characters without spaces or slashes")
        return v

    @model_validator(mode="after")
    def _nf4_dtype(self) -> Settings:
        if self.quantization == "nf4" and self.dtype != "bfloat16":
            raise ValueError(
                f"quantization nf4 needs dtype bfloat16 (vLLM's bitsandbytes loader packs NF4 for 16-bit "
                f"compute), got {self.dtype}; set --dtype bfloat16 or --quantization none"
            )
        return self

    @model_validator(mode="after")
    def _cpu_loras_hold_the_slots(self) -> Settings:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras {self.max_cpu_loras} is less than max_loras {self.max_loras}: the in-memory "
                "cache must hold every adapter of a batch; set --max-cpu-loras >= --max-loras or leave it unset"
            )
        return self

    @model_validator(mode="after")
    def _draft_ok(self) -> Settings:
        if self.speculation:
            if self.draft_model is None:
                raise ValueError("speculation is on but no draft model is set; set --draft-model or --no-speculation")
            _check_model_dir(self.draft_model, "draft model", "QSERVE_DRAFT_MODEL / --draft-model")
            tgt = json.loads((self.model / "config.json").read_text())
            drf = json.loads((self.draft_model / "config.json").read_text())
            if tgt.get("vocab_size") != drf.get("vocab_size"):
                raise ValueError(
                    f"draft vocab_size {drf.get('vocab_size')} differs from target vocab_size "
                    f"{tgt.get('vocab_size')}; the draft must share the target's tokenizer"
                )
            _check_same_tokenizer(self.model, self.draft_model)
        return self

    @property
    def draft_tokens_per_step(self) -> int:
        """Draft tokens proposed per speculation step: ``num_speculative_tokens`` with speculation on, else 0."""
        return self.num_speculative_tokens if self.speculation else 0

    @property
    def speculation_config(self) -> SpeculationConfig:
        """The policy, its step-time model (``speculation_cost_ms``) and online refit, as the engine gets them."""
        cost = CostModel(*(float(p) for p in self.speculation_cost_ms.split(",")))
        return SpeculationConfig(self.speculation_policy, cost, self.speculation_cost_online)
