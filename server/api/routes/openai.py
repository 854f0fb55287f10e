"""OpenAI API routes: thin wrappers around vLLM's OpenAI serving layer.

vLLM implements the protocol (chat templates, stop strings, logprobs, SSE
streaming, usage chunks); these routes resolve the request's ``model`` once in the
catalog (``server/catalog.py``), call that model's vLLM handler, and turn its result
into a response (``server/api/responses.py``).
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Depends, Request
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.tokenize.protocol import DetokenizeRequest, TokenizeRequest
from vllm.entrypoints.serve.utils.api_utils import validate_json_request, with_cancellation

from server.api.deps import CatalogDep, SettingsDep
from server.api.limits import check_sampling
from server.api.requests import ChatCompletionRequest, CompletionRequest
from server.api.responses import respond
from server.errors import BadRequest

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
async def create_completion(
    request: CompletionRequest, raw_request: Request, settings: SettingsDep, catalog: CatalogDep
):
    """Create a text completion (OpenAI Completions API), streamed with ``stream: true``."""
    refuse_ignored_fields(request)
    check_sampling(request.n, settings)
    handler = catalog.resolve(request.model).handlers.openai_serving_completion
    return await respond(await handler.create_completion(request, raw_request), request)


@router.post("/v1/chat/completions", dependencies=[Depends(validate_json_request)], responses=_ERRORS)
@with_cancellation
async def create_chat_completion(
    request: ChatCompletionRequest, raw_request: Request, settings: SettingsDep, catalog: CatalogDep
):
    """Create a chat completion (OpenAI Chat Completions API), streamed with ``stream: true``."""
    check_sampling(request.n, settings)
    handler = catalog.resolve(request.model).handlers.openai_serving_chat
    return await respond(await handler.create_chat_completion(request, raw_request), request)


@router.post("/tokenize", dependencies=[Depends(validate_json_request)], responses=_ERRORS)
@with_cancellation
async def tokenize(request: TokenizeRequest, raw_request: Request, catalog: CatalogDep):
    """Token ids of a prompt or chat messages as ``model`` (the base, an adapter or a merged model) reads them."""
    handler = catalog.resolve(request.model).handlers.serving_tokenization
    return await respond(await handler.create_tokenize(request, raw_request), request)


@router.post("/detokenize", dependencies=[Depends(validate_json_request)], responses=_ERRORS)
@with_cancellation
async def detokenize(request: DetokenizeRequest, raw_request: Request, catalog: CatalogDep):
    """The text of token ids as ``model`` decodes them."""
    handler = catalog.resolve(request.model).handlers.serving_tokenization
    return await respond(await handler.create_detokenize(request, raw_request), request)


@router.get("/v1/models")
async def list_models(catalog: CatalogDep):
    """List the served models: the base model, every loaded adapter and every merged model."""
    return {"object": "list", "data": await catalog.cards()}


@router.get("/v1/models/{model}")
async def retrieve_model(model: str, catalog: CatalogDep):
    """One entry of :func:`list_models` (OpenAI's retrieve model).

    Raises:
        NotFound: ``model`` is not served (the served ids are named).
    """
    return await catalog.card(model)
