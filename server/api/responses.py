"""vLLM serving results -> HTTP responses, with the OpenAI behaviour vLLM's own server gets wrong.

The rules, for every OpenAI route:

1. An :class:`ErrorResponse` becomes our envelope with its status (``server.errors.from_vllm``).
2. A stream is not started until its first event exists. vLLM reports input that fails in the
   engine's input processing (a prompt token id outside the vocabulary, a ``logit_bias`` key
   outside it) as the stream's first event, after a 200. Here such a first event becomes the
   same 4xx envelope the request gets without ``stream``, and no SSE is sent at all.
3. Errors that can only happen once tokens were sent stay SSE ``error`` events (the status is
   committed); their ``type`` is the envelope's for the status in ``error.code``.
4. ``echo`` with ``max_tokens: 0`` returns only the prompt; vLLM still generates one token
   internally and counted it in ``usage.completion_tokens``. Usage here counts what is returned.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse
from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

from server.errors import error_type, from_vllm

ERROR_EVENT_PREFIX = 'data: {"error"'


def _error_of(event: str) -> ErrorResponse | None:
    """The error carried by one SSE event string (``data: {"error": {...}}\\n\\n``), or None."""
    if not event.startswith(ERROR_EVENT_PREFIX):
        return None
    try:
        body = json.loads(event[len("data: ") :])
        return ErrorResponse(error=ErrorInfo(**body["error"]))
    except (ValueError, KeyError, TypeError):
        return None


def _typed(err: ErrorResponse) -> str:
    """The SSE error event carrying ``err`` with the envelope's ``type`` for its ``code``."""
    err.error.type = error_type(err.error.code)
    return f"data: {json.dumps({'error': err.error.model_dump()})}\n\n"


async def _rest(first: str, events: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """``first`` then every later event of ``events``, error events typed as in rule 3."""
    yield first
    async for event in events:
        err = _error_of(event)
        yield _typed(err) if err is not None else event


def _echo_only(request) -> bool:
    return bool(getattr(request, "echo", False)) and getattr(request, "max_tokens", None) == 0


def _count_returned_tokens(usage: dict) -> dict:
    """Usage for an ``echo`` + ``max_tokens: 0`` response: no completion tokens were returned."""
    return {**usage, "completion_tokens": 0, "total_tokens": usage["prompt_tokens"]}


async def _echo_usage(events: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """``events`` with every ``usage`` object counted as :func:`_count_returned_tokens` says."""
    async for event in events:
        if event.startswith("data: {") and '"usage"' in event:
            chunk = json.loads(event[len("data: ") :])
            if chunk.get("usage"):
                chunk["usage"] = _count_returned_tokens(chunk["usage"])
                event = f"data: {json.dumps(chunk)}\n\n"
        yield event


async def respond(result, request) -> JSONResponse | StreamingResponse:
    """Map a vLLM serving result for ``request`` (error, full response, or SSE event generator).

    For a stream this awaits its first event before any byte is sent (rule 2), so it returns only
    once the engine has accepted the request (or refused it). Closing the client meanwhile cancels
    the caller, which closes ``result`` and so aborts the engine request.
    """
    if isinstance(result, ErrorResponse):
        return from_vllm(result)
    if hasattr(result, "model_dump"):
        body = result.model_dump()
        if _echo_only(request) and body.get("usage"):
            body["usage"] = _count_returned_tokens(body["usage"])
        return JSONResponse(body)
    events: AsyncIterator[str] = _echo_usage(result) if _echo_only(request) else result
    try:
        first = await anext(events)
    except StopAsyncIteration:
        first = ""
    except BaseException:
        await result.aclose()
        raise
    err = _error_of(first)
    if err is not None:
        await result.aclose()
        return from_vllm(err)
    return StreamingResponse(_rest(first, events), media_type="text/event-stream")
