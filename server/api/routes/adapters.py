"""Adapter routes: upload (multipart), list, show, delete; an adapter's speculation override (set, clear)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from server.adapters.registry import PayloadTooLarge, Upload
from server.api.deps import AdaptersDep
from server.errors import BadRequest

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


async def _read(upload: UploadFile, limit: int, param: str) -> Upload:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"file {upload.filename!r} is over the upload limit of {limit} bytes", param=param)
    return Upload(upload.filename or "", data)


@router.post("", status_code=201)
async def upload_adapter(
    request: Request,
    registry: AdaptersDep,
    name: Annotated[str | None, Form(description="adapter name, used as the 'model' id in requests")] = None,
    files: Annotated[
        list[UploadFile] | None,
        File(
            description="adapter_config.json and adapter_model.safetensors, or one .tar.gz/.zip with both "
            "(and optionally a draft/ folder holding the paired draft adapter's two files)"
        ),
    ] = None,
    draft_files: Annotated[
        list[UploadFile] | None,
        File(
            description="optional paired draft adapter (a LoRA for the server's draft model): its "
            "adapter_config.json and adapter_model.safetensors, or one .tar.gz/.zip with both"
        ),
    ] = None,
    allow_base_mismatch: Annotated[
        bool,
        Form(
            description="serve an adapter whose weights cover only part of what its target_modules select in "
            "the base (it looks trained for another model); default false: such an upload is refused"
        ),
    ] = False,
):
    """Upload a PEFT LoRA adapter, optionally with its draft adapter; the same name again creates a new version."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest(
            "send multipart/form-data with a 'name' field and 'files' (adapter_config.json and "
            "adapter_model.safetensors, or one .tar.gz/.zip)",
            param="files",
        )
    if not name:
        raise BadRequest(
            "the 'name' form field is empty; give the adapter a name (1-64 of A-Z a-z 0-9 . _ -)", param="name"
        )
    if not files:
        raise BadRequest(
            "no 'files' were sent; attach adapter_config.json and adapter_model.safetensors", param="files"
        )
    registry.catalog.check_adapter_name(name)  # before reading the files: a name clash needs no upload
    uploads = [await _read(f, registry.max_upload_bytes, "files") for f in files]
    drafts = [await _read(f, registry.max_upload_bytes, "draft_files") for f in draft_files or []]
    record = await registry.upload(name, uploads, drafts or None, allow_base_mismatch)
    return registry.card(record.name)


@router.get("")
async def list_adapters(registry: AdaptersDep):
    """List stored adapters (current version of each)."""
    return {"object": "list", "data": [registry.card(r.name) for r in registry.list()]}


@router.get("/{name}")
async def get_adapter(name: str, registry: AdaptersDep):
    """Show one adapter's stored record and its speculation override."""
    return registry.card(name)


@router.delete("/{name}")
async def delete_adapter(name: str, registry: AdaptersDep):
    """Delete an adapter: new requests for it get 404, running ones finish."""
    record = await registry.delete(name)
    return {"id": name, "object": "adapter", "deleted": True, "version": record.version}


class SpeculationOverride(BaseModel):
    """Body of ``PUT /v1/adapters/{name}/speculation``."""

    model_config = ConfigDict(extra="forbid")
    k: StrictInt = Field(
        description="draft tokens per step for this adapter's requests: 0 (no drafting) to the server's "
        "--num-speculative-tokens; holds under both speculation policies"
    )


@router.put("/{name}/speculation")
async def set_speculation_override(name: str, body: SpeculationOverride, registry: AdaptersDep):
    """Fix the draft tokens per step of ``name``'s requests (admin); the adapter's card, override shown."""
    registry.get(name)
    await registry.overrides.set(name, body.k)
    return registry.card(name)


@router.delete("/{name}/speculation")
async def clear_speculation_override(name: str, registry: AdaptersDep):
    """Give ``name``'s k back to the speculation policy (admin); the adapter's card."""
    registry.get(name)
    await registry.overrides.set(name, None)
    return registry.card(name)
