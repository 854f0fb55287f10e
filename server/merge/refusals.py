"""What the merge routes answer when a model id or job cannot do what was asked: one place for the wording.

Each function returns (or raises) one of server/errors.py's typed errors; the message names the
id or job, why, and what to do next.
"""

from __future__ import annotations

from server.errors import Conflict, NotFound, ServiceUnavailable
from server.merge.entries import MergedEntry, ModelState
from server.merge.jobs import FINAL, MergeJob


def unavailable(entry: MergedEntry) -> ServiceUnavailable | None:
    """The 503 a request for ``entry``'s model gets, or None when its engine serves it."""
    model_id = entry.id
    if entry.state is ModelState.SERVING:
        if not entry.engine.llm.errored:
            return None
        return ServiceUnavailable(f"merged model {model_id!r}: its engine died and is being restarted; retry shortly")
    if entry.state is ModelState.DOWN:
        return ServiceUnavailable(f"merged model {model_id!r} is not served: {entry.down_reason}")
    job = entry.job
    return ServiceUnavailable(
        f"merged model {model_id!r} is not ready: merge job {job.id} is {job.status.value} "
        f"({job.stage}, {job.progress:.0%}); poll GET /v1/merges/{job.id}"
    )


def check_new_model_id(model: str, on_disk: bool, existing: int, max_merged_models: int) -> None:
    """Refuse ``model`` as a new merge's id once the catalog found it free (``ModelCatalog.check_merged_id``).

    ``on_disk``: its folder exists; ``existing``: merged models that exist or are being built.

    Raises:
        Conflict: ``on_disk``, or ``existing`` has reached ``max_merged_models``.
    """
    if on_disk:
        raise Conflict(
            f"model id {model!r} has a merged model folder on disk that is not served (its engine did not "
            f"start); delete it with DELETE /v1/models/{model} or choose another 'model'",
            param="model",
        )
    if existing >= max_merged_models:
        raise Conflict(
            f"{existing} merged models exist or are being merged and --max-merged-models is "
            f"{max_merged_models}; delete one with DELETE /v1/models/{{id}} first"
        )


def check_cancellable(job: MergeJob) -> None:
    """Raises Conflict if ``job`` finished (its status is named) or restores a finished merge (nothing to cancel)."""
    if job.status in FINAL:
        raise Conflict(f"merge job {job.id} already {job.status.value}; only queued or running jobs can be cancelled")
    if job.restored:
        raise Conflict(
            f"merge job {job.id} restores the finished merged model {job.model!r} (after a restart or an "
            f"engine death); there is no merge to cancel: delete the model with DELETE /v1/models/{job.model}"
        )


def delete_conflict(entry: MergedEntry) -> Conflict:
    """The 409 for deleting ``entry``'s model while its job runs (a building one: cancel it instead)."""
    model_id, job = entry.id, entry.job
    if entry.state is ModelState.RESTORING:
        return Conflict(
            f"merged model {model_id!r} is being restored: its engine is starting (job {job.id}, about a "
            f"minute); retry DELETE /v1/models/{model_id} when GET /v1/merges/{job.id} is final",
            param="model",
        )
    return Conflict(
        f"merged model {model_id!r} is still being built by job {job.id}; cancel it with "
        f"POST /v1/merges/{job.id}/cancel",
        param="model",
    )


def not_merged(model_id: str, base: str, adapter_names, served_ids: list[str]) -> NotFound:
    """The 404 for deleting ``model_id`` that is no merged model; names the base and adapter routes."""
    where = ""
    if model_id == base:
        where = " (the base model cannot be deleted)"
    elif model_id in adapter_names:
        where = f" (it is an adapter: DELETE /v1/adapters/{model_id})"
    known = ", ".join(served_ids) or "none"
    return NotFound(f"{model_id!r} is not a merged model{where}; merged models: {known}", param="model")
