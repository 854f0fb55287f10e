"""The merge job history: every job by id, the newest :data:`HISTORY_MAX` kept on disk across restarts.

Writes go to server/merge/store.py ``.jobs.json`` off the event loop, one at a time and in order
(the last write is the newest state); a failed write is logged, never fatal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging

from server.errors import NotFound
from server.merge.jobs import FINAL, JobStatus, MergeJob
from server.merge.store import MergedStore

log = logging.getLogger(__name__)

HISTORY_MAX = 100  # merge jobs kept in the history (newest first), across restarts


class JobHistory:
    """The jobs of one merge service (``jobs``: by id), loaded from and saved to ``store``'s history file."""

    def __init__(self, store: MergedStore) -> None:
        self.store = store
        self.jobs: dict[str, MergeJob] = {}
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
            self.save()  # the interrupted jobs' new status is durable too

    def get(self, job_id: str) -> MergeJob:
        """Raises NotFound naming where to list jobs."""
        try:
            return self.jobs[job_id]
        except KeyError:
            raise NotFound(f"merge job {job_id!r} does not exist; list jobs with GET /v1/merges", param="id") from None

    def revive_committed(self, job_id: str | None) -> bool:
        """Job ``job_id``, listed failed because the server stopped during it, committed its merged folder
        (it was killed during its engine start): the merge itself is complete, so it succeeded. Returns
        True if it was such a job (then :meth:`save` it)."""
        job = self.jobs.get(job_id)
        if job is None or not job.interrupted or job.status is not JobStatus.FAILED:
            return False
        job.status, job.error, job.progress = JobStatus.SUCCEEDED, None, 1.0
        job.stage = "merged and committed before the server stopped; served again by a restore job"
        return True

    def newest(self) -> list[MergeJob]:
        """The newest :data:`HISTORY_MAX` jobs (this process's and earlier ones), newest first."""
        return sorted(self.jobs.values(), key=lambda j: j.created_at, reverse=True)[:HISTORY_MAX]

    def save(self) -> None:
        """Queue a write of the newest jobs; finished jobs past :data:`HISTORY_MAX` are forgotten."""
        kept = self.newest()
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

    async def flush(self) -> None:
        """Wait until every write queued so far is done."""
        await asyncio.to_thread(self._writer.submit(lambda: None).result)

    async def close(self) -> None:
        """Wait for the queued writes (the history is on disk), then take no more."""
        await asyncio.to_thread(self._writer.shutdown, wait=True)
