"""A merged model's own vLLM engine: open it on a merged folder, stop it, reap its processes.

Each merged engine is a second ``AsyncLLM`` in this process (its engine core is its own
process), built by :func:`server.engine.build.build_engine_without_prometheus` in a worker thread:
vLLM's constructor blocks until the engine core is up (about a minute here) and the event loop
must keep serving. The ``vllm:*`` series are the base engine's alone; a merged model's metrics
are ours (:class:`server.engine.observed.ObservedEngine`, labelled with its model id).

:data:`EngineOpener` is the shape of :func:`open_merged_engine`; the merge service takes one, so
tests pass a fake that starts nothing.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.engine.observed import ObservedEngine
from server.merge.jobs import Precision
from server.merge.store import folder_bytes
from server.metrics import ServerMetrics
from server.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class MergedEngine:
    """A started merged engine: vLLM's engine, our observing proxy of it and vLLM's OpenAI handlers for it."""

    llm: Any  # vLLM AsyncLLM: ``errored``, ``shutdown()``, ``vllm_config``
    client: Any  # ObservedEngine over ``llm``: what the handlers call; ``active`` counts its requests
    handlers: Any  # starlette State holding vLLM's openai_serving_* handlers
    memory: dict  # the memory report (bytes): weight_bytes, kv_cache_bytes, engine_rss_bytes, ...
    processes: list = field(default_factory=list)  # psutil.Process of its engine's processes


# (settings, metrics, model_id, folder, manifest) -> the started engine; raises when it cannot start.
EngineOpener = Callable[[Settings, ServerMetrics, str, Path, dict], Awaitable[MergedEngine]]


def merged_settings(settings: Settings, model_id: str, folder: Path, precision: Precision) -> Settings:
    """The server settings of an engine on merged ``folder``: its target (and draft, if merged), no LoRA."""
    draft = folder / "draft" if (folder / "draft").is_dir() else settings.draft_model
    return settings.model_copy(update={
        "model": folder / "target",
        "served_model_name": model_id,
        "draft_model": draft,
        "quantization": "nf4" if precision is Precision.NF4 else "none",
        "enable_lora": False,
    })  # fmt: skip


def _child_processes() -> dict[int, Any]:
    import psutil

    return {p.pid: p for p in psutil.Process().children(recursive=True)}


async def open_merged_engine(
    settings: Settings, metrics: ServerMetrics, model_id: str, folder: Path, manifest: dict
) -> MergedEngine:
    """Start a vLLM engine on merged ``folder`` (its ``manifest`` read) and vLLM's OpenAI handlers for it.

    Raises whatever vLLM raises when the engine cannot start; an engine that started is shut down
    again when building its handlers fails.
    """
    from starlette.datastructures import State
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state

    from server.engine.build import build_engine_without_prometheus, vllm_namespace

    args = vllm_namespace(merged_settings(settings, model_id, folder, Precision(manifest["precision"])))
    args.disable_log_stats = True
    before = _child_processes()
    llm = await asyncio.to_thread(build_engine_without_prometheus, args)
    try:
        client = ObservedEngine(llm, metrics, model_id)
        handlers = State()
        await init_app_state(client, handlers, args, await client.get_supported_tasks())
        new = [p for pid, p in _child_processes().items() if pid not in before]
        memory = {
            "weight_bytes": sum(manifest["weight_bytes"].values()),
            "kv_cache_bytes": settings.kv_cache_space_gib * 2**30,
            "engine_rss_bytes": sum(p.memory_info().rss for p in new if p.is_running()),
            "engine_processes": len(new),
            "disk_bytes": folder_bytes(folder),
        }
        metrics.create_series(model_id, None)
        return MergedEngine(llm, client, handlers, memory, new)
    except BaseException:
        llm.shutdown()
        raise


async def reap(engine: MergedEngine, model_id: str, timeout_s: float = 10.0) -> None:
    """Wait (up to ``timeout_s`` seconds) until ``engine``'s processes have exited and been reaped.

    vLLM's shutdown signals its engine core but does not join it; ``multiprocessing.active_children()``
    joins exited children, so a deleted or dead engine leaves no zombie process behind.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        multiprocessing.active_children()
        if not any(p.is_running() for p in engine.processes):
            return
        await asyncio.sleep(0.1)
    log.warning("merged model %s: engine processes still running %.0f s after shutdown", model_id, timeout_s)


async def stop_merged_engine(engine: MergedEngine, model_id: str, grace_s: float) -> None:
    """Let requests on ``engine`` finish (up to ``grace_s`` seconds), shut it down and reap its processes."""
    deadline = time.monotonic() + grace_s
    while engine.client.active and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    engine.llm.shutdown()
    await reap(engine, model_id)
