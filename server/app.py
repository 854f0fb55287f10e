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
from server.errors import install_error_handlers
from server.limits import AdmissionGate, BodyLimit
from server.metrics import ServerMetrics
from server.routes import adapters, health, openai
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
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, send_counted)


async def open_adapters(settings: Settings, serving_models, engine) -> AdapterRegistry:
    """Open the adapter store, serve what it holds, then seed the shipped adapters not stored yet."""
    base_config = json.loads((settings.model / "config.json").read_text())
    registry = AdapterRegistry(
        AdapterStore(settings.adapter_store_dir),
        serving_models,
        engine,
        BaseShape.from_config(base_config),
        settings.served_model_name,
        settings.max_lora_rank,
        settings.max_adapter_bytes,
    )
    await registry.restore()
    if settings.seed_adapters_dir is not None:
        await registry.seed(settings.seed_adapters_dir)
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
        async with engine_opener(args) as engine:
            supported = await engine.get_supported_tasks()
            await init_app_state(engine, app.state, args, supported)
            if settings.enable_lora:
                app.state.adapters = await open_adapters(settings, app.state.openai_serving_models, engine)
            app.state.ready = True
            log.info("model %s ready", settings.served_model_name)
            watchdog = asyncio.create_task(watch_engine(app.state, engine, settings.exit_on_engine_death))
            yield
            watchdog.cancel()
            app.state.ready = False

    app = FastAPI(
        title="qlora-spec-server",
        description="OpenAI-compatible server: NF4 base, LoRA adapters, draft-target speculative decoding.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.engine_dead = False
    app.state.metrics = ServerMetrics()
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
    paths = {r.path for r in app.routes if hasattr(r, "path")}
    # Outermost last: count every response, then auth, body size, admission (server/auth.py, limits.py).
    app.add_middleware(AdmissionGate, settings=settings)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(BearerAuth, settings=settings, keys=KeyRing.from_settings(settings))
    app.add_middleware(_CountRequests, metrics=app.state.metrics, routes=paths)
    return app
