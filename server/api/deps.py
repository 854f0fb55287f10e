"""The server's typed state and the FastAPI dependencies routes reach it through.

The lifespan (``server/app.py``) fills one :class:`ServerState`, kept at ``app.state.qserve``;
routes never read ``app.state`` themselves. They declare what they need
(``SettingsDep``, ``CatalogDep``, ``AdaptersDep``, ``MergesDep``), as in FastAPI's full-stack
template, and the "not available yet" answers (503) live here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request

from server.adapters.registry import AdapterRegistry
from server.catalog import ModelCatalog
from server.dashboard.history import SpecHistory
from server.errors import ServiceUnavailable
from server.merge.service import MergeService
from server.metrics import ServerMetrics
from server.settings import Settings


@dataclass
class ServerState:
    """Everything one server process holds, with its lifecycle in two flags.

    ``engine`` is the base engine's observed ``EngineClient`` (None until the lifespan loaded it);
    ``ready`` is True from then until shutdown or engine death; ``engine_dead`` is set by the
    watchdog (``python -m server`` then exits 3). ``adapters`` / ``merges`` are None while loading
    and when LoRA or merging is off.
    """

    settings: Settings
    metrics: ServerMetrics
    spec_history: SpecHistory
    catalog: ModelCatalog
    engine: Any = None
    adapters: AdapterRegistry | None = None
    merges: MergeService | None = None
    ready: bool = False
    engine_dead: bool = False

    @classmethod
    def for_settings(cls, settings: Settings) -> ServerState:
        """A fresh state for ``settings``: metrics, their history sampler and an empty catalog."""
        metrics = ServerMetrics(settings.max_adapter_labels, settings.draft_tokens_per_step)
        return cls(settings, metrics, SpecHistory(metrics.registry), ModelCatalog(settings.served_model_name))


def server_state(request: Request) -> ServerState:
    """The :class:`ServerState` of the app serving ``request``."""
    return request.app.state.qserve


StateDep = Annotated[ServerState, Depends(server_state)]


def _settings(state: StateDep) -> Settings:
    return state.settings


def _catalog(state: StateDep) -> ModelCatalog:
    return state.catalog


def _metrics(state: StateDep) -> ServerMetrics:
    return state.metrics


def _adapters(state: StateDep) -> AdapterRegistry:
    """Raises ServiceUnavailable while the engine loads or with LoRA off."""
    if state.adapters is None:
        raise ServiceUnavailable(
            "adapters are not available: the engine is loading or LoRA is disabled (--enable-lora)"
        )
    return state.adapters


def _merges(state: StateDep) -> MergeService:
    """Raises ServiceUnavailable while the engine loads, or when merging is off (LoRA off or --max-merged-models 0)."""
    if state.merges is None:
        raise ServiceUnavailable(
            "merging is not available: the engine is loading, LoRA is disabled (--enable-lora), "
            "or --max-merged-models is 0"
        )
    return state.merges


SettingsDep = Annotated[Settings, Depends(_settings)]
CatalogDep = Annotated[ModelCatalog, Depends(_catalog)]
MetricsDep = Annotated[ServerMetrics, Depends(_metrics)]
AdaptersDep = Annotated[AdapterRegistry, Depends(_adapters)]
MergesDep = Annotated[MergeService, Depends(_merges)]
