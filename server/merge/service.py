"""The merge service: runs merge jobs, serves each merged model on its own vLLM engine, unmerges.

``POST /v1/adapters/{name}/merge`` submits a :class:`MergeJob`; jobs run one at a time in the
background while the server keeps serving. A job builds the merge in a staging folder
(server/merge/build.py), commits it (server/merge/store.py) and starts a vLLM engine on it
(server/merge/merged_engine.py). The merged model is then a model id of its own: listed in
``/v1/models``, served with no LoRA at all (zero per-token LoRA cost), deleted with
``DELETE /v1/models/{id}``. A failed or cancelled job leaves no folder, no engine and no model id
behind. Each id's lifecycle is one :class:`MergedEntry` (server/merge/entries.py); dead engines
are restarted by :class:`EngineSupervisor` (server/merge/supervisor.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from server.adapters.registry import AdapterRegistry
from server.catalog import ModelCatalog
from server.merge.build import build_merge
from server.merge.entries import MergedEntry, ModelState
from server.merge.history import JobHistory
from server.merge.jobs import FINAL, JobStatus, MergeCancelled, MergeJob, MergeRequest
from server.merge.merged_engine import EngineOpener, MergedEngine, open_merged_engine, stop_merged_engine
from server.merge.refusals import check_cancellable, check_new_model_id, delete_conflict, not_merged, unavailable
from server.merge.store import MergedStore
from server.merge.supervisor import ENGINE_POLL_S, MAX_ENGINE_RESTARTS, EngineSupervisor
from server.metrics import ServerMetrics
from server.precision import Precision
from server.settings import Settings

log = logging.getLogger(__name__)


class MergeService:
    """Merge jobs and merged models of one server.

    ``adapters``: the adapter registry; ``catalog``: checks a new merged id against every served id (server/app.py
    sets this service on it). ``engine_opener`` starts a merged model's engine (``merged_engine.EngineOpener``);
    ``engine_poll_s`` and ``max_engine_restarts`` are the supervisor's (server/merge/supervisor.py).
    """

    def __init__(
        self,
        settings: Settings,
        store: MergedStore,
        adapters: AdapterRegistry,
        catalog: ModelCatalog,
        metrics: ServerMetrics,
        engine_opener: EngineOpener = open_merged_engine,
        engine_poll_s: float = ENGINE_POLL_S,
        max_engine_restarts: int = MAX_ENGINE_RESTARTS,
    ) -> None:
        self.settings, self.store, self.metrics = settings, store, metrics
        self.adapters, self.catalog = adapters, catalog
        self.engine_opener = engine_opener
        self.history = JobHistory(store)
        self.jobs = self.history.jobs
        self.entries: dict[str, MergedEntry] = {}
        self._lock = asyncio.Lock()  # one merge at a time: each holds a model copy in memory
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.supervisor = EngineSupervisor(
            self.entries, self.jobs, metrics, self._start, store.manifest, lambda: self._closing,
            poll_s=engine_poll_s, max_restarts=max_engine_restarts,
        )  # fmt: skip

    def id_in_use(self, model_id: str) -> bool:
        """True if ``model_id`` is a merged model or the target of a merge or restore job not yet finished."""
        entry = self.entries.get(model_id)
        return entry is not None and entry.holds_id

    def served_ids(self) -> list[str]:
        """The ids of the merged models with an engine, sorted."""
        return sorted(i for i, e in self.entries.items() if e.state is ModelState.SERVING)

    def serving_state(self, model_id: str | None):
        """vLLM's handler state of merged model ``model_id``, or None if it is not a merged model.

        Raises:
            ServiceUnavailable: a merge job for ``model_id`` is still running (names the job to poll), its
                engine died and is being restarted, or it is on disk but down (says why and what to do).
        """
        entry = self.entries.get(model_id) if model_id is not None else None
        if entry is None:
            return None
        if (error := unavailable(entry)) is not None:
            raise error
        return entry.engine.handlers

    async def cards(self) -> list[dict]:
        """``/v1/models`` entries of the merged models (vLLM's model card plus what was merged)."""
        return [c for e in self.entries.values() if e.state is ModelState.SERVING for c in await e.cards(self.settings)]

    def get(self, job_id: str) -> MergeJob:
        """Raises NotFound naming where to list jobs."""
        return self.history.get(job_id)

    def list(self) -> list[MergeJob]:
        """The newest jobs (this process's and, from the history, earlier ones), newest first."""
        return self.history.newest()

    def submit(self, adapter: str, req: MergeRequest) -> MergeJob:
        """Queue a merge of stored adapter ``adapter`` as ``req`` says; returns the job at once.

        Raises:
            NotFound: unknown adapter.
            BadRequest: the model id is the base model's or an adapter's name.
            Conflict: the model id is taken by a merged model or running merge, or
                ``--max-merged-models`` merged models exist or are being built.
        """
        record = self.adapters.get(adapter)
        model = req.model or f"{adapter}-merged"
        self.catalog.check_merged_id(model)
        check_new_model_id(
            model,
            on_disk=self.store.path(model).exists(),
            existing=sum(e.holds_id for e in self.entries.values()),
            max_merged_models=self.settings.max_merged_models,
        )
        job = MergeJob(adapter, record.version, model, req.merge_base, req.precision)
        if (req.merge_base, req.precision) == (Precision.NF4, Precision.NF4):
            log.warning(
                "merge %s: adding to the NF4 base and re-quantizing rounds twice (see the fidelity report)", job.id
            )
        self.entries[model] = MergedEntry(model, ModelState.BUILDING, job=job)
        self._start(job)
        return job

    def cancel(self, job_id: str) -> MergeJob:
        """Ask job ``job_id`` to stop; a queued job is cancelled at once, a running one at its next step.

        Raises:
            NotFound: unknown job.
            Conflict: the job already finished (its status is named), or it restores a finished merge.
        """
        job = self.get(job_id)
        check_cancellable(job)
        job.cancel_event.set()
        if job.status is JobStatus.QUEUED:
            self._finish(job, JobStatus.CANCELLED)
            self._release(job)
        return job

    async def delete(self, model_id: str) -> dict:
        """Unmerge: stop serving merged model ``model_id``, shut its engine down, delete its folder.

        Requests already running on it get up to ``--shutdown-grace-s`` seconds to finish.
        Returns the OpenAI deletion object plus ``freed``: the memory report of the model.

        Raises:
            NotFound: ``model_id`` is not a merged model (names the base and adapter routes).
            Conflict: a merge job for ``model_id`` is still running (cancel it instead).
        """
        entry = self.entries.get(model_id)
        state = entry.state if entry is not None else None
        if state is ModelState.RESTORING and entry.job.status is JobStatus.QUEUED:
            entry.job.cancel_event.set()  # its engine never starts; the folder is deleted below
            self._finish(entry.job, JobStatus.CANCELLED, f"the model was deleted (DELETE /v1/models/{model_id})")
        elif state in (ModelState.RESTORING, ModelState.BUILDING):
            raise delete_conflict(entry)
        self.entries.pop(model_id, None)
        if state is not ModelState.SERVING and self.store.path(model_id).is_dir() and not model_id.startswith("."):
            # on disk but not served: its engine failed to start at restore, or died too often
            await asyncio.to_thread(self.store.delete, model_id)
            log.info("merged model %s (not served) deleted", model_id)
            return {"id": model_id, "object": "model", "deleted": True, "freed": None}
        if state is not ModelState.SERVING:
            raise not_merged(model_id, self.settings.served_model_name, self.adapters.records, self.served_ids())
        await stop_merged_engine(entry.engine, model_id, self.settings.shutdown_grace_s)
        await asyncio.to_thread(self.store.delete, model_id)
        self.metrics.forget_merged(model_id)
        log.info("merged model %s deleted", model_id)
        return {"id": model_id, "object": "model", "deleted": True, "freed": entry.engine.memory}

    def restore(self) -> None:
        """Serve every merged model already on disk (after a restart): one job each, engine start only."""
        revived = False
        for manifest in self.store.load_all():
            revived |= self.history.revive_committed(manifest.get("job"))
            job = MergeJob.restoring(manifest)
            self.entries[job.model] = MergedEntry(job.model, ModelState.RESTORING, job=job)
            self._start(job)
        if revived:
            self.history.save()

    async def join_jobs(self, timeout_s: float = 300.0) -> None:
        """Wait (at most ``timeout_s`` seconds) until no merge job is queued or running; engine watchers run on.

        Raises:
            TimeoutError: jobs still running after ``timeout_s``.
        """
        async with asyncio.timeout(timeout_s):
            while running := [t for t in self._tasks if t.get_name() in self.jobs]:
                await asyncio.gather(*running)

    async def close(self) -> None:
        """Stop running jobs (recorded as failed: the server shut down), shut every merged engine down."""
        self._closing = True
        for job in self.jobs.values():
            job.cancel_event.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in list(self.jobs.values()):
            if job.status not in FINAL:  # still queued: its task was cancelled before it ran
                self._finish(job, JobStatus.FAILED, _shutdown_message(job))
        for entry in list(self.entries.values()):
            if entry.state is ModelState.SERVING:
                self.entries.pop(entry.id).engine.llm.shutdown()
        await self.history.close()

    def _start(self, job: MergeJob) -> None:
        self.jobs[job.id] = job
        self.history.save()
        self._spawn(self._run(job), job.id)

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _finish(self, job: MergeJob, status: JobStatus, error: str | None = None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()
        if status is JobStatus.SUCCEEDED:
            job.advance("serving", 1.0)
        self.metrics.merge_jobs.labels(status.value).inc()
        self.history.save()
        log.info("merge job %s (%s -> %s): %s%s", job.id, job.adapter, job.model, status.value,
                 f": {error}" if error else "")  # fmt: skip

    def _release(self, job: MergeJob) -> None:
        """Free ``job``'s model id, if its entry is still ``job``'s."""
        entry = self.entries.get(job.model)
        if entry is not None and entry.job is job:
            del self.entries[job.model]

    async def _run(self, job: MergeJob) -> None:
        async with self._lock:
            if job.status in FINAL:  # cancelled while queued
                return
            job.status, job.started_at = JobStatus.RUNNING, time.time()
            self.history.save()
            staging: Path | None = None  # built, not yet committed
            new_folder: Path | None = None  # committed by this job (a restore job's folder was there before)
            engine: MergedEngine | None = None
            try:
                if job.restored:
                    folder, manifest = self.store.path(job.model), self.store.manifest(job.model)
                else:
                    staging = self.store.new_staging_dir(job.id)
                    manifest = await asyncio.to_thread(build_merge, self.settings, self.adapters, job, staging)
                    job.raise_if_cancelled()
                    folder = new_folder = await asyncio.to_thread(self.store.commit, staging, job.model, manifest)
                    staging = None
                job.advance("starting engine", 0.9)
                engine = await self.engine_opener(self.settings, self.metrics, job.model, folder, manifest)
                job.memory = engine.memory
                self.metrics.set_merged(job.model, engine.memory)
                job.raise_if_cancelled()
                entry = self.entries[job.model]
                entry.to_serving(folder, manifest, engine)
                self._spawn(self.supervisor.watch(entry, engine), f"watch-{entry.id}")
                self._finish(job, JobStatus.SUCCEEDED)
            except (MergeCancelled, asyncio.CancelledError):
                stopped = (JobStatus.FAILED, _shutdown_message(job)) if self._closing else (JobStatus.CANCELLED, None)
                self._finish(job, *stopped)
            except Exception as exc:
                log.exception("merge job %s failed", job.id)
                self._finish(job, JobStatus.FAILED, getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            finally:
                if job.status is not JobStatus.SUCCEEDED:
                    self._undo(job, engine, staging, new_folder)

    def _undo(self, job: MergeJob, engine: MergedEngine | None, staging: Path | None, new_folder: Path | None) -> None:
        """What a job that did not succeed leaves: no engine, no staging, no new folder; a restore job's
        folder stays on disk and the supervisor restarts it or marks it down."""
        if engine is not None:
            engine.llm.shutdown()
        if staging is not None:
            self.store.discard(staging)
        if new_folder is not None:
            self.store.delete(job.model)
        entry = self.entries.get(job.model)
        restore_failed = job.restored and job.status is JobStatus.FAILED and self.store.path(job.model).is_dir()
        if restore_failed and entry is not None and entry.job is job:
            self.supervisor.after_failed_restore(entry, job)
        else:
            self._release(job)
        self.metrics.forget_merged(job.model)


def _shutdown_message(job: MergeJob) -> str:
    """A job's error when the server shut down before it finished."""
    if job.restored:
        return "the server shut down during this job; the model is restored at the next start"
    return "the server shut down during this job; merge again"
