"""The merge service: runs merge jobs, serves each merged model on its own vLLM engine, unmerges.

``POST /v1/adapters/{name}/merge`` submits a :class:`MergeJob`; jobs run one at
a time in the background while the server keeps serving. A job copies the
adapter (and its paired draft adapter) into a staging folder, merges it into the
target (and the draft adapter into the draft: a matched draft for speculation),
measures the fidelity report of every merge option against the adapter served
unmerged on the NF4 base, commits the folder (server/merge/store.py) and starts
a vLLM engine on it. The merged model is then a model id of its own: listed in
``/v1/models``, served with no LoRA at all (zero per-token LoRA cost), deleted
with ``DELETE /v1/models/{id}``. A failed or cancelled job leaves no folder, no
engine and no model id behind.

Each merged engine is a second ``AsyncLLM`` in this process (its engine core is
its own process). It is built in a worker thread, because vLLM's constructor
blocks until the engine core is up (about a minute here) and the event loop
must keep serving, and without vLLM's Prometheus logger, which would unregister
the base engine's ``vllm:*`` collectors when a second engine starts; so the
``vllm:*`` series are the base engine's alone, and a merged model's metrics are
ours (:class:`server.observability.ObservedEngine`, labelled with its model id).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from server.merge.checkpoint import merge_model
from server.merge.jobs import FINAL, JobStatus, MergeCancelled, MergeJob, MergeRequest, Precision
from server.merge.memory import served_weight_bytes
from server.merge.nf4 import MergeBase
from server.merge.store import MergedStore, folder_bytes
from server.metrics import ServerMetrics
from server.observability import ObservedEngine
from server.settings import Settings

log = logging.getLogger(__name__)

# Fidelity bounds per (merge_base, precision): min greedy agreement, max mean KL (nats/token) against the
# adapter served unmerged on the NF4 base. Set from BENCHMARKS.md "Merge fidelity" (16 prompts x 32 tokens:
# default 1.0 / ~1e-7; bf16 base served NF4 0.95-0.97 / 5e-4-1.3e-3) with room for the 8-prompt probe set.
FIDELITY_BOUNDS = {
    (MergeBase.NF4, Precision.BF16): (1.0, 1e-5),
    (MergeBase.BF16, Precision.NF4): (0.85, 3e-3),
}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ENGINE_POLL_S = 1.0  # how often a merged model's engine is checked for death (seconds)
MAX_ENGINE_RESTARTS = 3  # restarts of one merged model's dead engine per server process, then it stays down
HISTORY_MAX = 100  # merge jobs kept in the history (newest first), across restarts


class MergeFailed(Exception):
    """A merge job cannot go on; the message says why and what to do (it becomes the job's ``error``)."""

    @property
    def message(self) -> str:
        return str(self.args[0])


def option_key(merge_base: MergeBase, precision: Precision) -> str:
    """The fidelity report's key of one merge option, e.g. ``merge_base=nf4,precision=bf16``."""
    return f"merge_base={merge_base.value},precision={precision.value}"


@dataclass
class MergedModel:
    """A merged model being served: its folder, its engine and vLLM's OpenAI handlers for it."""

    id: str
    folder: Path
    manifest: dict
    raw: Any  # vLLM AsyncLLM
    engine: ObservedEngine
    state: Any  # starlette State holding vLLM's openai_serving_* handlers
    memory: dict
    created: float
    processes: list = field(default_factory=list)  # psutil.Process of its engine's processes


def _child_processes() -> dict[int, Any]:
    import psutil

    return {p.pid: p for p in psutil.Process().children(recursive=True)}


def _build_engine(args) -> Any:
    """vLLM's ``AsyncLLM`` for parsed server ``args`` (blocking: call it in a worker thread).

    Request stats stay on (vLLM's TTFT and token timestamps reach our per-model metrics), but the
    engine gets a Prometheus logger that exports nothing: vLLM's own would unregister the base
    engine's ``vllm:*`` collectors from the process-wide registry.
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


class MergeService:
    """Merge jobs and merged models of one server."""

    def __init__(self, settings: Settings, store: MergedStore, adapters, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.store = store
        self.adapters = adapters  # server.adapters.registry.AdapterRegistry
        self.metrics = metrics
        self.jobs: dict[str, MergeJob] = {}
        self.models: dict[str, MergedModel] = {}
        self._lock = asyncio.Lock()  # one merge at a time: each holds a model copy in memory
        self._tasks: set[asyncio.Task] = set()
        self.down: dict[str, str] = {}  # merged models on disk whose engine is not up: why, and what to do
        self.restarts: dict[str, int] = {}  # engine restarts per merged model id (this process)
        self.deaths: dict[str, int] = {}  # engine deaths per merged model id (this process)
        self._closing = False
        # History writes leave the event loop, one at a time and in order (the last write is the newest state).
        self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-history")
        loaded = []
        for d in store.load_history():
            try:
                loaded.append(MergeJob.from_json(d))
            except Exception as exc:  # any malformed entry is skipped, never fatal
                log.error("merge job history: entry %r skipped (%s: %s)", str(d.get("id"))[:80], type(exc).__name__,
                          exc)  # fmt: skip
        for job in sorted(loaded, key=lambda j: j.created_at, reverse=True)[:HISTORY_MAX]:
            self.jobs[job.id] = job
        if any(j.interrupted for j in self.jobs.values()):
            self._save_history()  # the interrupted jobs' new status is durable too

    # ---- lookups used by the routes -------------------------------------------------------------

    def _pending(self) -> dict[str, MergeJob]:
        return {j.model: j for j in self.jobs.values() if j.status not in FINAL}

    def taken(self, model_id: str) -> bool:
        """True if ``model_id`` is a merged model or the target of a merge job not yet finished."""
        return model_id in self.models or model_id in self._pending()

    def serving_state(self, model_id: str | None):
        """vLLM's handler state of merged model ``model_id``, or None if it is not a merged model.

        Raises:
            ServiceUnavailable: a merge job for ``model_id`` is still running (names the job to poll), its
                engine died and is being restarted, or it is on disk but down (says why and what to do).
        """
        if model_id is None:
            return None
        served = self.models.get(model_id)
        if served is not None and not served.raw.errored:
            return served.state
        if served is not None:
            raise ServiceUnavailable(
                f"merged model {model_id!r}: its engine died and is being restarted; retry shortly"
            )
        if model_id in self.down:
            raise ServiceUnavailable(f"merged model {model_id!r} is not served: {self.down[model_id]}")
        job = self._pending().get(model_id)
        if job is not None:
            raise ServiceUnavailable(
                f"merged model {model_id!r} is not ready: merge job {job.id} is {job.status.value} "
                f"({job.stage}, {job.progress:.0%}); poll GET /v1/merges/{job.id}"
            )
        return None

    async def cards(self) -> list[dict]:
        """``/v1/models`` entries of the merged models (vLLM's model card plus what was merged)."""
        out = []
        for m in self.models.values():
            for card in (await m.state.openai_serving_models.show_available_models()).data:
                d = card.model_dump()
                d.update(created=int(m.created), root=str(m.folder), parent=self.settings.served_model_name)
                d["merge"] = {k: m.manifest[k] for k in ("adapter", "adapter_version", "merge_base", "precision")}
                d["merge"]["memory"] = m.memory
                out.append(d)
        return out

    def get(self, job_id: str) -> MergeJob:
        """Raises NotFound naming where to list jobs."""
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"merge job {job_id!r} does not exist; list jobs with GET /v1/merges", param="id") from None

    def list(self) -> list[MergeJob]:
        """The newest :data:`HISTORY_MAX` jobs (this process's and, from the history, earlier ones), newest first."""
        return sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)[:HISTORY_MAX]

    def _save_history(self) -> None:
        """Queue a write of the job history (server/merge/store.py ``.jobs.json``); failures are logged."""
        kept = self.list()
        for old in set(self.jobs) - {j.id for j in kept}:
            if self.jobs[old].status in FINAL:
                del self.jobs[old]
        jobs = [j.to_json() for j in kept]

        def write() -> None:
            try:
                self.store.save_history(jobs)
            except OSError:
                log.exception("merge job history not saved")

        self._writer.submit(write)

    # ---- submit, cancel, delete ----------------------------------------------------------------

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
        if model == self.settings.served_model_name or model in self.adapters.records:
            raise BadRequest(
                f"model id {model!r} is already the base model's or an adapter's name; choose another 'model'",
                param="model",
            )
        if self.taken(model):
            raise Conflict(
                f"model id {model!r} is already a merged model or being merged; delete it with "
                f"DELETE /v1/models/{model} or choose another 'model'",
                param="model",
            )
        if self.store.path(model).exists():
            raise Conflict(
                f"model id {model!r} has a merged model folder on disk that is not served (its engine did not "
                f"start); delete it with DELETE /v1/models/{model} or choose another 'model'",
                param="model",
            )
        building = len(self.models) + len(self._pending())
        if building >= self.settings.max_merged_models:
            raise Conflict(
                f"{building} merged models exist or are being merged and --max-merged-models is "
                f"{self.settings.max_merged_models}; delete one with DELETE /v1/models/{{id}} first"
            )
        job = MergeJob(adapter, record.version, model, req.merge_base, req.precision)
        if (req.merge_base, req.precision) == (MergeBase.NF4, Precision.NF4):
            log.warning(
                "merge %s: adding to the NF4 base and re-quantizing rounds twice (see the fidelity report)", job.id
            )
        self._start(job)
        return job

    def _start(self, job: MergeJob) -> None:
        self.jobs[job.id] = job
        self._save_history()
        self._spawn(self._run(job)).set_name(job.id)

    def cancel(self, job_id: str) -> MergeJob:
        """Ask job ``job_id`` to stop; a queued job is cancelled at once, a running one at its next step.

        Raises:
            NotFound: unknown job.
            Conflict: the job already finished (its status is named).
        """
        job = self.get(job_id)
        if job.status in FINAL:
            raise Conflict(
                f"merge job {job_id} already {job.status.value}; only queued or running jobs can be cancelled"
            )
        if job.restored:
            raise Conflict(
                f"merge job {job_id} restores the finished merged model {job.model!r} (after a restart or an "
                f"engine death); there is no merge to cancel: delete the model with DELETE /v1/models/{job.model}"
            )
        job.cancel_event.set()
        if job.status is JobStatus.QUEUED:
            self._finish(job, JobStatus.CANCELLED)
        return job

    async def delete(self, model_id: str) -> dict:
        """Unmerge: stop serving merged model ``model_id``, shut its engine down, delete its folder.

        Requests already running on it get up to ``--shutdown-grace-s`` seconds to finish.
        Returns the OpenAI deletion object plus ``freed``: the memory report of the model.

        Raises:
            NotFound: ``model_id`` is not a merged model (names the base and adapter routes).
            Conflict: a merge job for ``model_id`` is still running (cancel it instead).
        """
        job = self._pending().get(model_id)
        if job is not None and job.restored and job.status is JobStatus.QUEUED:
            job.cancel_event.set()  # its engine never starts; the folder is deleted below
            self._finish(job, JobStatus.CANCELLED, f"the model was deleted (DELETE /v1/models/{model_id})")
        elif job is not None and job.restored:
            raise Conflict(
                f"merged model {model_id!r} is being restored: its engine is starting (job {job.id}, about a "
                f"minute); retry DELETE /v1/models/{model_id} when GET /v1/merges/{job.id} is final",
                param="model",
            )
        elif job is not None:
            raise Conflict(
                f"merged model {model_id!r} is still being built by job {job.id}; cancel it with "
                f"POST /v1/merges/{job.id}/cancel",
                param="model",
            )
        served = self.models.pop(model_id, None)
        self.down.pop(model_id, None)
        self.restarts.pop(model_id, None)
        self.deaths.pop(model_id, None)
        if served is None and self.store.path(model_id).is_dir() and not model_id.startswith("."):
            # on disk but not served: its engine failed to start at restore, or died too often
            await asyncio.to_thread(self.store.delete, model_id)
            log.info("merged model %s (not served) deleted", model_id)
            return {"id": model_id, "object": "model", "deleted": True, "freed": None}
        if served is None:
            where = ""
            if model_id == self.settings.served_model_name:
                where = " (the base model cannot be deleted)"
            elif model_id in self.adapters.records:
                where = f" (it is an adapter: DELETE /v1/adapters/{model_id})"
            known = ", ".join(sorted(self.models)) or "none"
            raise NotFound(f"{model_id!r} is not a merged model{where}; merged models: {known}", param="model")
        await self._stop(served)
        await asyncio.to_thread(self.store.delete, model_id)
        self.metrics.forget_merged(model_id)
        log.info("merged model %s deleted", model_id)
        return {"id": model_id, "object": "model", "deleted": True, "freed": served.memory}

    # ---- start-up and shut-down ----------------------------------------------------------------

    def restore(self) -> None:
        """Serve every merged model already on disk (after a restart): one job each, engine start only."""
        committed_then_cut = False
        for manifest in self.store.load_all():
            cut = self.jobs.get(manifest.get("job"))
            if cut is not None and cut.interrupted and cut.status is JobStatus.FAILED:
                # killed after its commit (during its engine start): the merge itself is complete
                cut.status, cut.error, cut.progress = JobStatus.SUCCEEDED, None, 1.0
                cut.stage = "merged and committed before the server stopped; served again by a restore job"
                committed_then_cut = True
            self._start(self._restore_job(manifest))
        if committed_then_cut:
            self._save_history()

    @staticmethod
    def _restore_job(manifest: dict) -> MergeJob:
        """A job that only starts an engine on the committed merged folder ``manifest`` describes."""
        job = MergeJob(
            manifest["adapter"],
            manifest["adapter_version"],
            manifest["model"],
            MergeBase(manifest["merge_base"]),
            Precision(manifest["precision"]),
            restored=True,
        )
        job.fidelity, job.draft = manifest.get("fidelity"), manifest.get("draft")
        return job

    async def _watch(self, served: MergedModel) -> None:
        """Poll ``served``'s engine every :data:`ENGINE_POLL_S` seconds; when it dies, restart it.

        The base engine's death stops the whole server (server/watchdog.py); a merged engine's death
        (its engine core killed, e.g. by the OOM killer) takes only that model down: its requests get
        503, its engine is shut down and a restore job (listed in ``GET /v1/merges``) starts a new one
        on the same folder, up to :data:`MAX_ENGINE_RESTARTS` times per process. Past that the model
        stays down (503 saying so) until it is deleted.
        """
        while self.models.get(served.id) is served and not served.raw.errored:
            await asyncio.sleep(ENGINE_POLL_S)
        if self.models.get(served.id) is not served:
            return  # deleted, or the server is shutting down
        self.models.pop(served.id)
        self.metrics.merged_engine_deaths.labels(served.id).inc()
        deaths = self.deaths[served.id] = self.deaths.get(served.id, 0) + 1
        # The restore job is pending from here on (requests get 503 naming it, the id stays taken), and
        # starts once the dead engine is shut down and reaped.
        job = self._queue_restart(served.id, served.manifest, f"its engine died {deaths} times")
        served.raw.shutdown()
        await _reap(served)
        self.metrics.forget_merged(served.id)
        if job is not None and job.status is JobStatus.QUEUED and not self._closing:
            self._start(job)

    def _queue_restart(self, model_id: str, manifest: dict, why: str) -> MergeJob | None:
        """Register (not start) a restore job for merged model ``model_id``, or past
        :data:`MAX_ENGINE_RESTARTS` restarts mark it down with ``why``. Returns the job, or None."""
        restarts = self.restarts.get(model_id, 0)
        if restarts >= MAX_ENGINE_RESTARTS:
            self.down[model_id] = (
                f"{why}; not restarted again: delete it with DELETE /v1/models/{model_id} and merge again"
            )
            log.error("merged model %s: %s", model_id, self.down[model_id])
            return None
        self.restarts[model_id] = restarts + 1
        job = self._restore_job(manifest)
        job.stage = "waiting for the dead engine to stop"
        self.jobs[job.id] = job
        log.error("merged model %s: %s; restarting it (job %s, restart %d of %d)", model_id, why, job.id,
                  restarts + 1, MAX_ENGINE_RESTARTS)  # fmt: skip
        return job

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        for model_id in list(self.models):
            self.models.pop(model_id).raw.shutdown()
        await asyncio.to_thread(self._writer.shutdown, wait=True)  # the history is on disk

    # ---- the job --------------------------------------------------------------------------------

    def _finish(self, job: MergeJob, status: JobStatus, error: str | None = None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()
        if status is JobStatus.SUCCEEDED:
            job.advance("serving", 1.0)
        self.metrics.merge_jobs.labels(status.value).inc()
        self._save_history()
        log.info("merge job %s (%s -> %s): %s%s", job.id, job.adapter, job.model, status.value,
                 f": {error}" if error else "")  # fmt: skip

    async def _run(self, job: MergeJob) -> None:
        async with self._lock:
            if job.status in FINAL:  # cancelled while queued
                return
            job.status, job.started_at = JobStatus.RUNNING, time.time()
            self._save_history()
            staging: Path | None = None
            committed = False
            served: MergedModel | None = None
            try:
                if job.restored:
                    folder = self.store.path(job.model)
                    manifest = self.store.manifest(job.model)
                else:
                    staging = self.store.new_staging_dir(job.id)
                    manifest = await asyncio.to_thread(self._build, job, staging)
                    job.check()
                    folder = await asyncio.to_thread(self.store.commit, staging, job.model, manifest)
                    staging, committed = None, True
                job.advance("starting engine", 0.9)
                served = await self._serve(job, folder, manifest)
                job.check()
                self.models[job.model] = served
                self.down.pop(job.model, None)
                self._spawn(self._watch(served)).set_name(f"watch-{served.id}")
                self._finish(job, JobStatus.SUCCEEDED)
            except (MergeCancelled, asyncio.CancelledError):
                if self._closing:
                    self._finish(job, JobStatus.FAILED, _shutdown_message(job))
                else:
                    self._finish(job, JobStatus.CANCELLED)
            except Exception as exc:
                log.exception("merge job %s failed", job.id)
                self._finish(job, JobStatus.FAILED, getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}")
            finally:
                if job.status is not JobStatus.SUCCEEDED:
                    if served is not None:
                        served.raw.shutdown()
                    if staging is not None:
                        self.store.discard(staging)
                    if committed:  # a new merge that did not come up leaves nothing; a restored one stays on disk
                        self.store.delete(job.model)
                    if job.restored and job.status is JobStatus.FAILED and self.store.path(job.model).is_dir():
                        self._after_failed_restore(job)
                    self.metrics.forget_merged(job.model)

    def _after_failed_restore(self, job: MergeJob) -> None:
        """A restore job's engine did not start: try again if it was a restart after an engine death
        (and restarts remain), else mark the model down (503 saying why and what to do)."""
        why = f"its engine did not start (merge job {job.id}: {job.error})"
        if self.restarts.get(job.model, 0) > 0 and not self._closing:
            try:
                again = self._queue_restart(job.model, self.store.manifest(job.model), why)
            except (OSError, ValueError) as exc:  # its manifest became unreadable: down, as below
                why = f"{why}; its manifest is unreadable ({exc})"
            else:
                if again is not None:
                    self._start(again)
                return  # restarted, or down past the limit (_queue_restart said why)
        self.down[job.model] = f"{why}; delete it with DELETE /v1/models/{job.model} and merge again"

    def _copy_adapter(self, job: MergeJob, dest: Path, with_draft: bool) -> None:
        """Copy the adapter's current version (and its draft adapter) to ``dest``; sets ``job.adapter_version``.

        The current version when the job starts, not when it was queued: uploads in between replace it.

        Raises:
            MergeFailed: the adapter was deleted, or its version replaced and pruned while being copied.
        """
        record = self.adapters.records.get(job.adapter)
        if record is None:
            raise MergeFailed(
                f"adapter {job.adapter!r} was deleted before its merge started; upload it and merge again"
            )
        job.adapter_version = record.version
        try:
            src = self.adapters.store.path(job.adapter, record.version)
            dest.mkdir()
            for name in ADAPTER_FILES:
                shutil.copyfile(src / name, dest / name)
            if with_draft and (src / "draft" / ADAPTER_FILES[0]).is_file():
                (dest / "draft").mkdir()
                for name in ADAPTER_FILES:
                    shutil.copyfile(src / "draft" / name, dest / "draft" / name)
        except (KeyError, FileNotFoundError):
            raise MergeFailed(
                f"adapter {job.adapter!r} version {record.version} was replaced or deleted while the merge copied "
                "it; merge again"
            ) from None

    def _build(self, job: MergeJob, staging: Path) -> dict:
        """Copy the adapter, merge target and draft, measure fidelity: the merged folder's files (worker thread).

        Returns the manifest. Raises MergeCancelled when the job is cancelled between steps.
        """
        import torch

        from server.merge.probe import fidelity_report

        torch.set_num_threads(1)  # the engines' compute threads keep the cores
        s = self.settings
        job.advance("copying adapter", 0.02)
        adapter = staging / "adapter"
        has_draft = s.speculation and s.draft_model is not None
        self._copy_adapter(job, adapter, with_draft=has_draft)
        job.check()
        serve_nf4 = job.precision is Precision.NF4
        job.advance("merging target", 0.05)
        merge_model(s.model, adapter, staging / "target", job.merge_base, serve_nf4, check=job.check)
        if not has_draft:
            job.draft = None
        elif (adapter / "draft").is_dir():
            job.advance("merging draft", 0.2)
            merge_model(s.draft_model, adapter / "draft", staging / "draft", job.merge_base, serve_nf4, check=job.check)
            job.draft = "merged: the adapter's draft adapter merged into the draft model"
        else:
            job.draft = "plain: the adapter has no draft adapter; the base draft model proposes"
        job.check()
        job.advance("fidelity report: target", 0.3)
        report = {"target": fidelity_report(
            s.model, adapter, check=job.check, progress=lambda f: job.advance("fidelity report: target", 0.3 + 0.4 * f)
        )}  # fmt: skip
        if (staging / "draft").is_dir():
            report["draft"] = fidelity_report(
                s.draft_model, adapter / "draft", check=job.check,
                progress=lambda f: job.advance("fidelity report: draft", 0.7 + 0.15 * f),
            )  # fmt: skip
        key = option_key(job.merge_base, job.precision)
        chosen = report["target"]["options"][key]
        bound = FIDELITY_BOUNDS.get((job.merge_base, job.precision))
        report["chosen"] = key
        report["bound"] = None if bound is None else {"min_greedy_agreement": bound[0], "max_mean_kl": bound[1]}
        report["within_bound"] = None if bound is None else (
            chosen["greedy_agreement"] >= bound[0] and chosen["mean_kl"] <= bound[1]
        )  # fmt: skip
        job.fidelity = report
        weights = {"target": served_weight_bytes(staging / "target", serve_nf4)}
        if (staging / "draft").is_dir():
            weights["draft"] = served_weight_bytes(staging / "draft", serve_nf4)
        return {
            "model": job.model,
            "adapter": job.adapter,
            "adapter_version": job.adapter_version,
            "base_model": s.served_model_name,
            "merge_base": job.merge_base.value,
            "precision": job.precision.value,
            "draft": job.draft,
            "fidelity": report,
            "weight_bytes": weights,
            "job": job.id,
            "created": time.time(),
        }

    async def _serve(self, job: MergeJob, folder: Path, manifest: dict) -> MergedModel:
        """Start a vLLM engine on merged ``folder`` and vLLM's OpenAI handlers for it."""
        from starlette.datastructures import State
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        from server.engine import vllm_namespace

        s = self.settings
        draft = folder / "draft" if (folder / "draft").is_dir() else s.draft_model
        merged = s.model_copy(update={
            "model": folder / "target",
            "served_model_name": job.model,
            "draft_model": draft,
            "quantization": "nf4" if job.precision is Precision.NF4 else "none",
            "enable_lora": False,
        })  # fmt: skip
        args = vllm_namespace(merged)
        args.disable_log_stats = True
        before = _child_processes()
        raw = await asyncio.to_thread(_build_engine, args)
        try:
            engine = ObservedEngine(raw, self.metrics, job.model)
            state = State()
            await init_app_state(engine, state, args, await engine.get_supported_tasks())
            new = [p for pid, p in _child_processes().items() if pid not in before]
            weights = manifest["weight_bytes"]
            memory = {
                "weight_bytes": sum(weights.values()),
                "kv_cache_bytes": s.kv_cache_space_gib * 2**30,
                "engine_rss_bytes": sum(p.memory_info().rss for p in new if p.is_running()),
                "engine_processes": len(new),
                "disk_bytes": folder_bytes(folder),
            }
            job.memory = memory
            self.metrics.set_merged(job.model, memory)
            spec = raw.vllm_config.speculative_config
            self.metrics.touch(job.model, None, spec.num_speculative_tokens if spec else 0)
            return MergedModel(job.model, folder, manifest, raw, engine, state, memory, manifest["created"], new)
        except BaseException:
            raw.shutdown()
            raise

    async def _stop(self, served: MergedModel) -> None:
        """Let requests on ``served`` finish (up to ``--shutdown-grace-s``), then shut its engine down."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while served.engine.active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        served.raw.shutdown()
        await _reap(served)


def _shutdown_message(job: MergeJob) -> str:
    """A job's error when the server shut down before it finished."""
    if job.restored:
        return "the server shut down during this job; the model is restored at the next start"
    return "the server shut down during this job; merge again"


async def _reap(served: MergedModel, timeout_s: float = 10.0) -> None:
    """Wait (up to ``timeout_s`` seconds) until ``served``'s engine processes have exited and been reaped.

    vLLM's shutdown signals its engine core but does not join it; ``multiprocessing.active_children()``
    joins exited children, so a deleted or dead engine leaves no zombie process behind.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        multiprocessing.active_children()
        if not any(p.is_running() for p in served.processes):
            return
        await asyncio.sleep(0.1)
    log.warning("merged model %s: engine processes still running %.0f s after shutdown", served.id, timeout_s)
