"""OpenAI API routes: thin wrappers around vLLM's OpenAI serving layer.

vLLM implements the protocol (chat templates, stop strings, logprobs, SSE
streaming, usage chunks); these routes only select its handler from the app
state, and turn its result into a response with our error envelope.
"""

from __future__ import annotations

import json
from http import HTTPStatus

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from vllm.entrypoints.serve.utils.api_utils import validate_json_request, with_cancellation

from server.errors import BadRequest, NotFound, ServiceUnavailable
from server.limits import check_sampling
from server.routes.responses import respond

router = APIRouter(tags=["openai"])

_ERRORS = {
    HTTPStatus.BAD_REQUEST.value: {"model": ErrorResponse},
    HTTPStatus.UNAUTHORIZED.value: {"model": ErrorResponse},
    HTTPStatus.FORBIDDEN.value: {"model": ErrorResponse},
    HTTPStatus.NOT_FOUND.value: {"model": ErrorResponse},
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE.value: {"model": ErrorResponse},
    HTTPStatus.TOO_MANY_REQUESTS.value: {"model": ErrorResponse},
    HTTPStatus.SERVICE_UNAVAILABLE.value: {"model": ErrorResponse},
}


def _handler(raw_request: Request, attr: str, model: str | None = None):
    """The vLLM serving object stored under ``attr`` for ``model``: a merged model's own, else the app's.

    Raises:
        ServiceUnavailable: while the engine (or ``model``'s merge) is still loading.
    """
    merges = getattr(raw_request.app.state, "merges", None)
    state = merges.serving_state(model) if merges is not None else None
    handler = getattr(state if state is not None else raw_request.app.state, attr, None)
    if handler is None:
        raise ServiceUnavailable("the engine is still loading; retry when GET /ready returns 200")
    if state is None and model:
        check_model_served(raw_request, model)
    return handler


SERVED_IDS_SHOWN = 20


def check_model_served(raw_request: Request, model: str) -> None:
    """Refuse a ``model`` that is neither the base model, a stored adapter nor a merged model.

    vLLM's own 404 names only the base model; a client that mistyped an adapter or merged id
    should see those too (the first :data:`SERVED_IDS_SHOWN`, then where to list the rest).

    Raises:
        NotFound: ``model`` is not served (param ``model``).
    """
    models = getattr(raw_request.app.state, "openai_serving_models", None)
    if models is None or models.is_base_model(model) or model in models.lora_requests:
        return
    merges = getattr(raw_request.app.state, "merges", None)
    ids = [p.name for p in models.base_model_paths] + sorted(models.lora_requests)
    ids += merges.served_ids() if merges is not None else []
    shown = ", ".join(ids[:SERVED_IDS_SHOWN])
    more = f" and {len(ids) - SERVED_IDS_SHOWN} more" if len(ids) > SERVED_IDS_SHOWN else ""
    raise NotFound(
        f"model {model[:200]!r} does not exist; served models: {shown}{more} (all of them: GET /v1/models)",
        param="model",
    )


def refuse_ignored_fields(request: CompletionRequest) -> None:
    """Refuse OpenAI Completions fields that vLLM 0.32 would accept and silently ignore.

    vLLM's request models allow unknown fields (logged, then dropped); ``best_of``
    was removed from vLLM, so ``best_of: 3`` would quietly return one candidate, and
    ``best_of: 1, n: 2`` would return two where OpenAI refuses (``best_of`` must be >= ``n``).

    Raises:
        BadRequest: ``best_of`` smaller than ``n``, or other than 1 (param ``best_of``).
    """
    best_of = (request.model_extra or {}).get("best_of")
    n = request.n or 1
    if best_of is not None and (not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < n):
        raise BadRequest(
            f"best_of is {best_of!r}; it must be an integer >= n ({n}), as in OpenAI's API", param="best_of"
        )
    if best_of is not None and best_of != 1:
        raise BadRequest(
            f"best_of is {best_of!r}; this server does not support best_of (vLLM removed it): "
            "omit it or send 1, and use n for several choices",
            param="best_of",
        )


@router.post("/v1/completions", dependencies=[Depends(validate_json_request)], responses=_ERRORS)
@with_cancellation
async def create_completion(request: CompletionRequest, raw_request: Request):
    """Create a text completion (OpenAI Completions API), streamed with ``stream: true``."""
    refuse_ignored_fields(request)
    check_sampling(request.n, raw_request.app.state.settings)
    handler = _handler(raw_request, "openai_serving_completion", request.model)
    return await respond(await handler.create_completion(request, raw_request), request)


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)], responses=_ERRORS)
@with_cancellation
async def create_chat_completion(request: ChatCompletionRequest, raw_request: Request):
    """Create a chat completion (OpenAI Chat Completions API), streamed with ``stream: true``."""
    check_sampling(request.n, raw_request.app.state.settings)
    handler = _handler(raw_request, "openai_serving_chat", request.model)
    return await respond(await handler.create_chat_completion(request, raw_request), request)


@router.post("/tokenize", dependencies=[Depends(validate_json_request)], responses=_ERRORS)
@with_cancellation
async def tokenize(request: TokenizeRequest, raw_request: Request):
    """Token ids of a prompt or chat messages as ``model`` (the base, an adapter or a merged model) reads them."""
    handler = _handler(raw_request, "serving_tokenization", request.model)
    return await respond(await handler.create_tokenize(request, raw_request), request)


@router.post("/detokenize", dependencies=[Depends(validate_json_request)], responses=_ERRORS)
@with_cancellation
async def detokenize(request: DetokenizeRequest, raw_request: Request):
    """The text of token ids as ``model`` decodes them."""
    handler = _handler(raw_request, "serving_tokenization", request.model)
    return await respond(await handler.create_detokenize(request, raw_request), request)


@router.get("/v1/models")
async def list_models(raw_request: Request):
    """List the served models: the base model, every loaded adapter and every merged model."""
    handler = _handler(raw_request, "openai_serving_models")
    listing = (await handler.show_available_models()).model_dump()
    merges = getattr(raw_request.app.state, "merges", None)
    if merges is not None:
        listing["data"] += await merges.cards()
    return JSONResponse(listing)


@router.get("/v1/models/{model}")
async def retrieve_model(raw_request: Request, model: str):
    """One entry of :func:`list_models` (OpenAI's retrieve model).

    Raises:
        NotFound: ``model`` is not served (the served ids are named).
    """
    listing = (await list_models(raw_request)).body
    data = json.loads(listing)["data"]
    for card in data:
        if card["id"] == model:
            return card
    known = ", ".join(c["id"] for c in data)
    raise NotFound(f"model {model[:200]!r} does not exist (served models: {known})", param="model")
