"""Merge routes: merge an adapter into the base, follow and cancel the job, unmerge (server/merge/service.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.errors import ServiceUnavailable
from server.merge.jobs import MergeRequest
from server.merge.service import MergeService

router = APIRouter(tags=["merges"])


def merges(request: Request) -> MergeService:
    """The app's merge service.

    Raises:
        ServiceUnavailable: while the engine loads, or when merging is off (LoRA off or --max-merged-models 0).
    """
    service = getattr(request.app.state, "merges", None)
    if service is None:
        raise ServiceUnavailable(
            "merging is not available: the engine is loading, LoRA is disabled (--enable-lora), "
            "or --max-merged-models is 0"
        )
    return service


@router.post("/v1/adapters/{name}/merge", status_code=202)
async def merge_adapter(request: Request, name: str, body: MergeRequest | None = None):
    """Merge adapter ``name`` into the base and serve it as its own model id; returns the job (202).

    Poll ``GET /v1/merges/{id}`` for ``status``, ``stage``, ``progress``, then ``fidelity`` and ``memory``.
    """
    job = merges(request).submit(name, body or MergeRequest())
    return JSONResponse(job.to_json(), status_code=202, headers={"Location": f"/v1/merges/{job.id}"})


@router.get("/v1/merges")
async def list_merges(request: Request):
    """List merge jobs of this server process (newest first; merged models restored at start included)."""
    return {"object": "list", "data": [j.to_json() for j in merges(request).list()]}


@router.get("/v1/merges/{job_id}")
async def get_merge(request: Request, job_id: str):
    """Show one merge job: status, stage, progress, error, fidelity report, memory report."""
    return merges(request).get(job_id).to_json()


@router.post("/v1/merges/{job_id}/cancel")
async def cancel_merge(request: Request, job_id: str):
    """Cancel a queued or running merge job; nothing of it is kept."""
    return merges(request).cancel(job_id).to_json()


@router.delete("/v1/models/{model}")
async def delete_model(request: Request, model: str):
    """Delete (unmerge) a merged model: its engine stops, its memory and disk are freed."""
    return await merges(request).delete(model)
