"""The FastAPI app factory: settings in, app out; the engine lives in the lifespan.

``create_app(settings)`` builds the app; its lifespan starts vLLM's async
engine (NF4 target, draft-target speculation, LoRA), then initialises vLLM's
OpenAI serving layer and marks the app ready. Nothing is a module global: the
state is one typed ``ServerState`` (``server/api/deps.py``) that routes reach
through FastAPI dependencies.
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
from server.api.auth import BearerAuth, KeyRing
from server.api.deps import ServerState
from server.api.limits import AdmissionGate, BodyLimit
from server.api.middleware import CountRequests
from server.api.routes import adapters, dashboard, health, merges, openai
from server.catalog import ModelCatalog
from server.engine.build import open_engine, set_engine_environment, vllm_namespace
from server.engine.observed import ObservedEngine
from server.engine.watchdog import watch_engine
from server.errors import install_error_handlers
from server.merge.service import MergeService
from server.merge.store import MergedStore
from server.metrics import ServerMetrics
from server.settings import Settings

log = logging.getLogger(__name__)

EngineOpener = Callable[[Any], AbstractAsyncContextManager[Any]]


async def open_adapters(settings: Settings, catalog: ModelCatalog, engine, metrics: ServerMetrics) -> AdapterRegistry:
    """Open the adapter store, serve what it holds, then seed the shipped adapters not stored yet.

    Draft adapters must fit the draft model; without one (speculation off) they are refused.
    """
    base_config = json.loads((settings.model / "config.json").read_text())
    draft_shape = None
    if settings.speculation and settings.draft_model is not None:
        draft_shape = BaseShape.from_config(json.loads((settings.draft_model / "config.json").read_text()))
    make, store = AdapterRegistry, AdapterStore
    if settings.registry_url is not None:  # replicas: one registry in PostgreSQL (docs/scaling.md)
        from server.adapters.shared_registry import SharedAdapterRegistry  # psycopg: only a replica needs it
        from server.adapters.shared_store import SharedStore

        make, store = SharedAdapterRegistry.for_url(settings.registry_url.get_secret_value()), SharedStore
    registry = make(
        store(settings.adapter_store_dir),
        catalog,
        engine,
        BaseShape.from_config(base_config),
        settings.max_lora_rank,
        settings.max_adapter_bytes,
        metrics,
        draft_shape=draft_shape,
        draft_tokens_per_step=settings.draft_tokens_per_step,
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
        ValueError: a malformed API keys file (server/api/auth.py).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        set_engine_environment(settings)
        args = vllm_namespace(settings)
        async with engine_opener(args) as raw_engine:
            # vLLM's serving layer calls generate() on this proxy: per-adapter metrics (server/engine/observed.py).
            engine = ObservedEngine(raw_engine, state.metrics, settings.served_model_name)
            state.metrics.create_series(settings.served_model_name, None)
            handlers = State()  # vLLM's serving objects for the base engine, reached through the catalog
            await init_app_state(engine, handlers, args, await engine.get_supported_tasks())
            state.catalog.handlers = handlers
            state.engine = engine
            if settings.enable_lora:
                # The catalog's members are set here and only here: each joins the model-id namespace.
                state.adapters = await open_adapters(settings, state.catalog, raw_engine, state.metrics)
                state.catalog.adapters = state.adapters
                if settings.max_merged_models > 0:
                    store = MergedStore(settings.merged_models_dir)
                    state.merges = MergeService(settings, store, state.adapters, state.catalog, state.metrics)
                    state.catalog.merges = state.merges
                    state.merges.restore()  # merged models on disk come up in the background
            state.ready = True
            log.info("model %s ready", settings.served_model_name)
            sampler = asyncio.create_task(state.spec_history.run())
            watchdog = asyncio.create_task(watch_engine(state, raw_engine, settings.exit_on_engine_death))
            try:
                yield
            finally:
                state.ready = False
                watchdog.cancel()
                sampler.cancel()
                if state.merges is not None:
                    await state.merges.close()
                if state.adapters is not None:
                    await state.adapters.close()

    app = FastAPI(
        title="qlora-spec-server",
        description="OpenAI-compatible server: NF4 base, LoRA adapters, draft-target speculative decoding.",
        lifespan=lifespan,
    )
    state = app.state.qserve = ServerState.for_settings(settings)
    state.metrics.info.labels(
        settings.served_model_name,
        settings.quantization,
        str(settings.draft_model) if settings.speculation else "",
        str(settings.draft_tokens_per_step),
    ).set(1)
    if settings.draft_tokens_per_step:
        cost = settings.speculation_config.cost
        for requests, lora in (("base", False), ("adapter", True)):
            state.metrics.break_even.labels(settings.served_model_name, requests).set(
                cost.break_even_acceptance(settings.draft_tokens_per_step, lora=lora)
            )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(adapters.router)
    app.include_router(merges.router)
    app.include_router(dashboard.router)
    paths = {r.path for r in app.routes if hasattr(r, "path")}
    # Outermost last: count every response, then auth, body size, admission (server/api/auth.py, limits.py).
    app.add_middleware(AdmissionGate, settings=settings)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(BearerAuth, settings=settings, keys=KeyRing.from_settings(settings))
    app.add_middleware(CountRequests, metrics=state.metrics, routes=paths)
    return app
