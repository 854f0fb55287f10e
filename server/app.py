"""The FastAPI app factory: settings in, app out; the engine lives in the lifespan.

``create_app(settings)`` builds the app; its lifespan starts vLLM's async
engine (NF4 target, draft-target speculation, LoRA), then initialises vLLM's
OpenAI serving layer into ``app.state`` and marks the app ready. Nothing is a
module global: routes reach state through ``request.app.state``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from server.adapters.registry import AdapterRegistry
from server.adapters.store import AdapterStore
from server.adapters.validate import BaseShape
from server.auth import BearerAuth, KeyRing
from server.engine import open_engine, set_engine_environment, vllm_namespace
from server.errors import error_type, install_error_handlers
from server.limits import AdmissionGate, BodyLimit
from server.merge.service import MergeService
from server.merge.store import MergedStore
from server.metrics import ServerMetrics
from server.metrics_history import SpecHistory
from server.observability import ObservedEngine
from server.routes import adapters, dashboard, health, merges, openai
from server.settings import Settings
from server.watchdog import watch_engine

log = logging.getLogger(__name__)

EngineOpener = Callable[[Any], AbstractAsyncContextManager[Any]]


class _CountRequests:
    """Pure ASGI middleware counting responses by route and status (no body buffering,
    so streaming and client-disconnect detection are untouched)."""

    def __init__(self, app, metrics: ServerMetrics, routes: set[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.requests.labels(route, str(status)).inc()
                if status >= 400:
                    self.metrics.errors.labels(error_type(status), str(status)).inc()
            await send(message)

        return await self.app(scope, receive, send_counted)


async def open_adapters(settings: Settings, serving_models, engine, metrics: ServerMetrics) -> AdapterRegistry:
    """Open the adapter store, serve what it holds, then seed the shipped adapters not stored yet.

    Draft adapters must fit the draft model; without one (speculation off) they are refused.
    """
    base_config = json.loads((settings.model / "config.json").read_text())
    draft_shape = None
    if settings.speculation and settings.draft_model is not None:
        draft_shape = BaseShape.from_config(json.loads((settings.draft_model / "config.json").read_text()))
    registry = AdapterRegistry(
        AdapterStore(settings.adapter_store_dir),
        serving_models,
        engine,
        BaseShape.from_config(base_config),
        settings.served_model_name,
        settings.max_lora_rank,
        settings.max_adapter_bytes,
        metrics,
        draft_shape=draft_shape,
    )
    await registry.restore()
    if settings.seed_adapters_dir is not None:
        await registry.seed(settings.seed_adapters_dir)
    await registry.refresh_residency()
    return registry


def create_app(settings: Settings, engine_opener: EngineOpener = open_engine) -> FastAPI:
    """Build the server app for ``settings``.

    ``engine_opener(vllm_args)`` is an async context manager yielding a vLLM
    ``EngineClient``; tests may pass their own. Engine start-up errors
    propagate out of the lifespan, so uvicorn exits non-zero.

    Raises:
        ValueError: a malformed API keys file (server/auth.py).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        set_engine_environment(settings)
        args = vllm_namespace(settings)
        async with engine_opener(args) as raw_engine:
            # vLLM's serving layer calls generate() on this proxy: per-adapter metrics (server/observability.py).
            engine = ObservedEngine(raw_engine, app.state.metrics, settings.served_model_name)
            spec = raw_engine.vllm_config.speculative_config
            app.state.metrics.touch(settings.served_model_name, None, spec.num_speculative_tokens if spec else 0)
            supported = await engine.get_supported_tasks()
            await init_app_state(engine, app.state, args, supported)
            if settings.enable_lora:
                app.state.adapters = await open_adapters(
                    settings, app.state.openai_serving_models, raw_engine, app.state.metrics
                )
                if settings.max_merged_models > 0:
                    app.state.merges = MergeService(
                        settings, MergedStore(settings.merged_models_dir), app.state.adapters, app.state.metrics
                    )
                    app.state.merges.restore()  # merged models on disk come up in the background
            app.state.ready = True
            log.info("model %s ready", settings.served_model_name)
            sampler = asyncio.create_task(app.state.spec_history.run())
            watchdog = asyncio.create_task(watch_engine(app.state, raw_engine, settings.exit_on_engine_death))
            try:
                yield
            finally:
                app.state.ready = False
                watchdog.cancel()
                sampler.cancel()
                if getattr(app.state, "merges", None) is not None:
                    await app.state.merges.close()

    app = FastAPI(
        title="qlora-spec-server",
        description="OpenAI-compatible server: NF4 base, LoRA adapters, draft-target speculative decoding.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.engine_dead = False
    app.state.metrics = ServerMetrics(settings.max_adapter_labels)
    app.state.spec_history = SpecHistory(app.state.metrics.registry)
    app.state.metrics.info.labels(
        settings.served_model_name,
        settings.quantization,
        str(settings.draft_model) if settings.speculation else "",
        str(settings.num_speculative_tokens if settings.speculation else 0),
    ).set(1)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(adapters.router)
    app.include_router(merges.router)
    app.include_router(dashboard.router)
    paths = {r.path for r in app.routes if hasattr(r, "path")}
    # Outermost last: count every response, then auth, body size, admission (server/auth.py, limits.py).
    app.add_middleware(AdmissionGate, settings=settings)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(BearerAuth, settings=settings, keys=KeyRing.from_settings(settings))
    app.add_middleware(_CountRequests, metrics=app.state.metrics, routes=paths)
    return app
