"""Merge jobs: the resource a client polls while an adapter is merged (``/v1/merges``).

Modelled on OpenAI's fine-tuning jobs (``status``, ``created_at``,
``finished_at``, ``error``, ``POST .../cancel``). A job moves
``queued -> running -> succeeded | failed | cancelled``; while running,
``stage`` names the step and ``progress`` is its fraction done (0..1).
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from server.precision import Precision


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class MergeCancelled(Exception):
    """Raised inside a merge step when its job was cancelled."""


class MergeRequest(BaseModel):
    """Body of ``POST /v1/adapters/{name}/merge``.

    ``precision``: how the merged target (and draft) are served: ``bf16`` (the
    stored merge as is) or ``nf4`` (re-quantized in flight by vLLM's bitsandbytes
    loader, blocks of NF4_BLOCK_SIZE). ``merge_base``: the base weights the LoRA delta is added
    to: ``nf4`` (the NF4-dequantized base, which a QLoRA adapter was trained
    against) or ``bf16`` (the original checkpoint). Defaults: the option the
    fidelity numbers pick (BENCHMARKS.md, "Merge fidelity").
    """

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="model id of the merged model: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit "
        "(default '<adapter>-merged')",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
    )
    precision: Precision = Field(Precision.BF16, description="serving precision: bf16 or nf4")
    merge_base: Precision = Field(Precision.NF4, description="base weights the delta is added to: nf4 or bf16")


@dataclass
class MergeJob:
    """One merge: what is merged, how, and how far it got."""

    adapter: str
    adapter_version: int
    model: str
    merge_base: Precision
    precision: Precision
    restored: bool = False  # a merged model found on disk at start: only its engine is started
    id: str = field(default_factory=lambda: "merge-" + uuid.uuid4().hex[:16])
    status: JobStatus = JobStatus.QUEUED
    stage: str = "queued"
    progress: float = 0.0
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    draft_summary: str | None = None  # prose: which draft model proposes for the merged model, and why
    fidelity: dict | None = None
    memory: dict | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)
    interrupted: bool = field(default=False, repr=False)  # from the history: the server stopped during it

    def raise_if_cancelled(self) -> None:
        """Raise :class:`MergeCancelled` if the job was cancelled (called between steps, from any thread)."""
        if self.cancel_event.is_set():
            raise MergeCancelled(f"merge job {self.id} was cancelled")

    def advance(self, stage: str, progress: float) -> None:
        """Enter ``stage`` at ``progress`` (0..1)."""
        self.stage, self.progress = stage, progress

    @classmethod
    def restoring(cls, manifest: dict[str, Any]) -> MergeJob:
        """A job that only starts an engine on the committed merged folder ``manifest`` describes.

        Raises:
            KeyError, ValueError: ``manifest`` lacks a field or holds an unknown merge base or precision.
        """
        job = cls(
            manifest["adapter"], manifest["adapter_version"], manifest["model"], Precision(manifest["merge_base"]),
            Precision(manifest["precision"]), restored=True,
        )  # fmt: skip
        job.fidelity, job.draft_summary = manifest.get("fidelity"), manifest.get("draft")
        return job

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MergeJob:
        """A finished job back from :meth:`to_json` output (the history kept across restarts).

        A job that was not finished when it was saved was cut short by a crash or kill: it comes back
        ``failed``, saying so.

        Raises:
            KeyError, ValueError, TypeError: ``d`` is not a job's JSON (a missing key, a wrong type or value).
        """

        def number(v: Any, optional: bool = True) -> float | None:
            if v is None and optional:
                return None
            t = float(v)  # TypeError / ValueError for anything but a number
            if not math.isfinite(t):
                raise ValueError(f"{v!r} is not finite")
            return t

        error = d["error"]
        job = cls(
            str(d["adapter"]), int(d["adapter_version"]), str(d["model"]), Precision(d["merge_base"]),
            Precision(d["precision"]), restored=bool(d["restored"]), id=str(d["id"]),
            status=JobStatus(d["status"]), stage=str(d["stage"]), progress=min(max(number(d["progress"], False), 0), 1),
            created_at=number(d["created_at"], False), started_at=number(d["started_at"]),
            finished_at=number(d["finished_at"]), error=None if error is None else str(error["message"]),
            draft_summary=d["draft"], fidelity=d["fidelity"], memory=d["memory"],
        )  # fmt: skip
        if job.status not in FINAL:
            job.interrupted = True
            job.status, job.finished_at = JobStatus.FAILED, job.finished_at or time.time()
            then = "the model is restored at the next start" if job.restored else "merge again"
            job.error = f"the server stopped while this job was {d['status']}; {then}"
        return job

    def to_json(self) -> dict[str, Any]:
        """The job as the API returns it (times in Unix seconds)."""
        return {
            "id": self.id,
            "object": "merge.job",
            "adapter": self.adapter,
            "adapter_version": self.adapter_version,
            "model": self.model,
            "merge_base": self.merge_base.value,
            "precision": self.precision.value,
            "restored": self.restored,
            "status": self.status.value,
            "stage": self.stage,
            "progress": round(self.progress, 3),
            "cancel_requested": self.cancel_event.is_set() and self.status not in FINAL,
            "created_at": int(self.created_at),
            "started_at": None if self.started_at is None else int(self.started_at),
            "finished_at": None if self.finished_at is None else int(self.finished_at),
            "error": None if self.error is None else {"message": self.error},
            "draft": self.draft_summary,
            "fidelity": self.fidelity,
            "memory": self.memory,
        }
