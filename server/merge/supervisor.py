"""Supervising merged engines: notice a death, restart the engine, leave the model down past a limit.

The base engine's death stops the whole server (server/engine/watchdog.py); a merged engine's death
(its engine core killed, e.g. by the OOM killer) takes only that model down: its requests get
503, its engine is shut down and a restore job (listed in ``GET /v1/merges``) starts a new one on
the same folder, up to ``max_restarts`` times per process, a restart that fails to start counting
as one. Past that the model stays down (503 saying so) until it is deleted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from server.merge.entries import MergedEntry
from server.merge.jobs import JobStatus, MergeJob
from server.merge.merged_engine import MergedEngine, reap
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)

ENGINE_POLL_S = 1.0  # how often a merged model's engine is checked for death (seconds)
MAX_ENGINE_RESTARTS = 3  # restarts of one merged model's dead engine per server process, then it stays down


class EngineSupervisor:
    """Watches the merged engines of one merge service and restarts the dead ones.

    ``entries`` and ``jobs`` are the service's own (an id's entry, every job by id);
    ``start_job(job)`` runs a registered job; ``read_manifest(model_id)`` reads a committed
    folder's manifest (raises OSError or ValueError); ``is_closing()`` is True once the service
    shuts down, when nothing is restarted.
    """

    def __init__(
        self,
        entries: dict[str, MergedEntry],
        jobs: dict[str, MergeJob],
        metrics: ServerMetrics,
        start_job: Callable[[MergeJob], None],
        read_manifest: Callable[[str], dict],
        is_closing: Callable[[], bool],
        poll_s: float = ENGINE_POLL_S,
        max_restarts: int = MAX_ENGINE_RESTARTS,
    ) -> None:
        self.entries, self.jobs, self.metrics = entries, jobs, metrics
        self.start_job, self.read_manifest, self.is_closing = start_job, read_manifest, is_closing
        self.poll_s, self.max_restarts = poll_s, max_restarts

    def _watching(self, entry: MergedEntry, engine: MergedEngine) -> bool:
        """True while ``engine`` is still ``entry``'s (not deleted, not shut down by the service)."""
        return self.entries.get(entry.id) is entry and entry.engine is engine

    async def watch(self, entry: MergedEntry, engine: MergedEngine) -> None:
        """Poll ``engine`` every ``poll_s`` seconds while it serves ``entry``; when it dies, restart it."""
        while self._watching(entry, engine) and not engine.llm.errored:
            await asyncio.sleep(self.poll_s)
        if not self._watching(entry, engine):
            return  # deleted, or the server is shutting down
        self.metrics.merged_engine_deaths.labels(entry.id).inc()
        entry.deaths += 1
        # The restore job is pending from here on (requests get 503 naming it, the id stays in use), and
        # starts once the dead engine is shut down and reaped.
        job = self.restart_or_down(entry, entry.manifest, f"its engine died {entry.deaths} times")
        engine.llm.shutdown()
        await reap(engine, entry.id)
        self.metrics.forget_merged(entry.id)
        if job is not None and job.status is JobStatus.QUEUED and not self.is_closing():
            self.start_job(job)

    def restart_or_down(self, entry: MergedEntry, manifest: dict, why: str) -> MergeJob | None:
        """Register (not start) a restore job for ``entry`` on its folder (``manifest``), or past
        ``max_restarts`` restarts mark it down with ``why``. Returns the job, or None when down."""
        if entry.restarts >= self.max_restarts:
            entry.to_down(f"{why}; not restarted again: delete it with DELETE /v1/models/{entry.id} and merge again")
            log.error("merged model %s: %s", entry.id, entry.down_reason)
            return None
        entry.restarts += 1
        job = MergeJob.restoring(manifest)
        job.stage = "waiting for the dead engine to stop"
        self.jobs[job.id] = job
        entry.to_restoring(job)
        log.error("merged model %s: %s; restarting it (job %s, restart %d of %d)", entry.id, why, job.id,
                  entry.restarts, self.max_restarts)  # fmt: skip
        return job

    def after_failed_restore(self, entry: MergedEntry, job: MergeJob) -> None:
        """Restore job ``job``'s engine did not start: try again if it was a restart after an engine death
        (and restarts remain), else mark ``entry`` down (503 saying why and what to do)."""
        why = f"its engine did not start (merge job {job.id}: {job.error})"
        if entry.restarts > 0 and not self.is_closing():
            try:
                again = self.restart_or_down(entry, self.read_manifest(entry.id), why)
            except (OSError, ValueError) as exc:  # its manifest became unreadable: down, as below
                why = f"{why}; its manifest is unreadable ({exc})"
            else:
                if again is not None:
                    self.start_job(again)
                return  # restarted, or down past the limit (restart_or_down said why)
        entry.to_down(f"{why}; delete it with DELETE /v1/models/{entry.id} and merge again")
