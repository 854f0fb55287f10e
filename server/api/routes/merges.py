"""Merge routes: merge an adapter into the base, follow and cancel the job, unmerge (server/merge/service.py)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from server.api.deps import MergesDep
from server.merge.jobs import MergeRequest

router = APIRouter(tags=["merges"])


@router.post("/v1/adapters/{name}/merge", status_code=202)
async def merge_adapter(name: str, merges: MergesDep, body: MergeRequest | None = None):
    """Merge adapter ``name`` into the base and serve it as its own model id; returns the job (202).

    Poll ``GET /v1/merges/{id}`` for ``status``, ``stage``, ``progress``, then ``fidelity`` and ``memory``.
    """
    job = merges.submit(name, body or MergeRequest())
    return JSONResponse(job.to_json(), status_code=202, headers={"Location": f"/v1/merges/{job.id}"})


@router.get("/v1/merges")
async def list_merges(merges: MergesDep):
    """List merge jobs of this server process (newest first; merged models restored at start included)."""
    return {"object": "list", "data": [j.to_json() for j in merges.list()]}


@router.get("/v1/merges/{job_id}")
async def get_merge(job_id: str, merges: MergesDep):
    """Show one merge job: status, stage, progress, error, fidelity report, memory report."""
    return merges.get(job_id).to_json()


@router.post("/v1/merges/{job_id}/cancel")
async def cancel_merge(job_id: str, merges: MergesDep):
    """Cancel a queued or running merge job; nothing of it is kept."""
    return merges.cancel(job_id).to_json()


@router.delete("/v1/models/{model}")
async def delete_model(model: str, merges: MergesDep):
    """Delete (unmerge) a merged model: its engine stops, its memory and disk are freed."""
    return await merges.delete(model)
