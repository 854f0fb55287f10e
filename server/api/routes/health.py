"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from server.api.deps import StateDep
from server.engine import vllm_patches
from server.errors import error_response
from server.speculation.config import SpeculationConfig

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/health")
async def health():
    """Liveness: the process is up and serving HTTP (the engine may still be loading)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(state: StateDep):
    """Readiness: 200 once the engine is loaded and answering (with the engine's own quantization,
    dtype and speculative config, its speculation policy included, the vLLM patches applied, and the adapter
    registry's link: with several replicas still 200 while the database is away, as the replica serves on), 503
    before that or after the engine died."""
    engine = state.engine
    if engine is None or not state.ready:
        return error_response(503, "engine is loading")
    try:
        await engine.check_health()
    except Exception as exc:  # vLLM raises EngineDeadError (or others) when the core is gone
        return error_response(503, f"engine is not healthy: {type(exc).__name__}")
    config = engine.vllm_config
    spec = config.speculative_config
    handed = SpeculationConfig.from_vllm_config(config)  # what the engine core's scheduler reads
    return JSONResponse(
        {
            "status": "ready",
            "model": state.settings.served_model_name,
            # Read back from the running engine, not from our settings.
            "quantization": config.model_config.quantization,
            "dtype": str(config.model_config.dtype).removeprefix("torch."),
            "max_model_len": config.model_config.max_model_len,
            "speculative": None
            if spec is None
            else {
                "method": spec.method,
                "draft_model": spec.draft_model_config.model if spec.draft_model_config else None,
                "draft_quantization": spec.draft_model_config.quantization if spec.draft_model_config else None,
                "num_speculative_tokens": spec.num_speculative_tokens,
                "policy": handed.policy,
                "cost_online": handed.cost_online,
            },
            "lora": config.lora_config is not None,
            # The shared registry's link (several replicas): this replica serves on while it is away.
            "registry": None if state.adapters is None else state.adapters.link_report(),
            "vllm_patches": vllm_patches.report(),  # in this (the API) process; the engine's load the same list
        }
    )


@router.get("/metrics")
async def metrics(state: StateDep):
    """Prometheus text format: vLLM's engine metrics followed by the server's own."""
    registry = state.adapters
    if registry is not None and state.ready:
        try:
            await registry.refresh_residency()
        except Exception as exc:  # a dead engine must not take /metrics down with it
            log.warning("adapter residency not refreshed: %s: %s", type(exc).__name__, exc)
    if state.engine is not None and state.ready:
        await state.engine.refresh_speculation()  # k in force and acceptance estimate per adapter; never raises
    body = generate_latest(REGISTRY) + generate_latest(state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
