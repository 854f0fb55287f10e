"""A merged model id's lifecycle: one :class:`MergedEntry` per id, its state one :class:`ModelState`.

An id's entry moves ``BUILDING -> SERVING`` (a merge job), ``RESTORING -> SERVING`` (a restore
job: after a server restart, or after its engine died), ``SERVING -> RESTORING`` (engine death,
restarts left) and ``-> DOWN`` (its engine did not start again, or died too often). A merge that
fails or is cancelled, and a deleted model, leave no entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from server.merge.jobs import MergeJob
from server.merge.merged_engine import MergedEngine
from server.settings import Settings


class ModelState(StrEnum):
    BUILDING = "building"  # a merge job builds its folder, then starts its first engine
    RESTORING = "restoring"  # a restore job starts an engine on its committed folder
    SERVING = "serving"  # its engine is up (or died a moment ago and its watcher has not seen it yet)
    DOWN = "down"  # on disk, no engine and none coming: ``down_reason`` says why and what to do


@dataclass
class MergedEntry:
    """One merged model id: its state, and what that state needs (the job, the engine, the reason)."""

    id: str
    state: ModelState
    job: MergeJob | None = None  # BUILDING, RESTORING: the job a request is told to poll
    engine: MergedEngine | None = None  # SERVING
    folder: Path | None = None  # SERVING: the committed merged folder
    manifest: dict | None = None  # SERVING: its merge.json
    down_reason: str | None = None  # DOWN
    restarts: int = 0  # engine restarts after a death (this process)
    deaths: int = 0  # engine deaths (this process)

    def to_restoring(self, job: MergeJob) -> None:
        """A restore job ``job`` is to start an engine on the committed folder."""
        self.state, self.job, self.engine, self.down_reason = ModelState.RESTORING, job, None, None

    def to_serving(self, folder: Path, manifest: dict, engine: MergedEngine) -> None:
        """``engine`` is up on ``folder``."""
        self.state, self.job, self.engine, self.down_reason = ModelState.SERVING, None, engine, None
        self.folder, self.manifest = folder, manifest

    def to_down(self, reason: str) -> None:
        """No engine and none coming; ``reason`` says why and what to do."""
        self.state, self.job, self.engine, self.down_reason = ModelState.DOWN, None, None, reason

    async def cards(self, settings: Settings) -> list[dict]:
        """SERVING: its ``/v1/models`` entries: vLLM's model card plus ``merge`` (what was merged, memory)."""
        out = []
        for card in (await self.engine.handlers.openai_serving_models.show_available_models()).data:
            d = card.model_dump()
            d.update(created=int(self.manifest["created"]), root=str(self.folder), parent=settings.served_model_name)
            d["merge"] = {k: self.manifest[k] for k in ("adapter", "adapter_version", "merge_base", "precision")}
            d["merge"]["memory"] = self.engine.memory
            out.append(d)
        return out

    @property
    def holds_id(self) -> bool:
        """True while the id is served or being built or restored (a DOWN id is guarded by its folder)."""
        return self.state is not ModelState.DOWN
