"""Typed API errors and the one mapping from exceptions to the OpenAI error envelope.

Every error response of the server has the shape OpenAI's clients parse::

    {"error": {"message": str, "type": str, "param": str | None, "code": int}}

``code`` repeats the HTTP status (as vLLM's server does). Errors raised after a
stream has started cannot change the status; vLLM's serving layer then sends
the same envelope as a final ``data:`` event before ``[DONE]``.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# OpenAI's error ``type`` strings by HTTP status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    501: "server_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """An error the client should see, with its HTTP status and the parameter at fault."""

    status: HTTPStatus = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(ApiError):
    """400: the request is malformed or a parameter is out of range."""

    status = HTTPStatus.BAD_REQUEST


class NotFound(ApiError):
    """404: unknown model, adapter or resource."""

    status = HTTPStatus.NOT_FOUND


class Conflict(ApiError):
    """409: the request conflicts with the current state (e.g. a merge job still running)."""

    status = HTTPStatus.CONFLICT


class ServiceUnavailable(ApiError):
    """503: the engine is not loaded or has died."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


def error_type(status: int) -> str:
    """OpenAI's error ``type`` string for an HTTP status code."""
    return ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def envelope(status: int, message: str, param: str | None = None) -> dict:
    """Return the OpenAI error envelope for ``status`` (an HTTP status code)."""
    return {
        "error": {
            "message": message,
            "type": error_type(status),
            "param": param,
            "code": status,
        }
    }


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    """A JSONResponse carrying :func:`envelope`."""
    return JSONResponse(envelope(status, message, param), status_code=status, headers=headers)


@functools.cache
def _request_fields() -> frozenset[str]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return frozenset(CompletionRequest.model_fields) | frozenset(ChatCompletionRequest.model_fields)


_LEADING_NAME = re.compile(r"^`?([a-z_]+)`? (?:must|cannot|is|should)\b")


def param_named_in(message: str) -> str | None:
    """The request field a vLLM validation message starts with, e.g. ``"min_p must be in [0, 1]"`` -> ``"min_p"``.

    vLLM's ``SamplingParams`` checks raise plain ``ValueError`` without a
    ``param``; the OpenAI envelope should still say which field was wrong.
    Only names of real request fields are returned.
    """
    match = _LEADING_NAME.match(message)
    if match and match.group(1) in _request_fields():
        return match.group(1)
    return None


async def send_envelope(send, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
    """Send :func:`envelope` as a whole response through an ASGI ``send`` (for pure ASGI middleware)."""
    body = json.dumps(envelope(status, message, param)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def from_vllm(err) -> JSONResponse:
    """Re-issue a vLLM ``ErrorResponse`` (from its serving layer) in our envelope, keeping status and param.

    A 400 without ``param`` gets the field its message names (:func:`param_named_in`).
    """
    param = err.error.param
    if err.error.code >= 500 and err.error.message.startswith(ENGINE_DEAD_MESSAGE):
        return engine_dead_response()
    if param is None and err.error.code == HTTPStatus.BAD_REQUEST:
        param = param_named_in(err.error.message)
    return error_response(err.error.code, err.error.message, param)


# vLLM's EngineDeadError message (vllm/v1/engine/exceptions.py; tests/test_errors.py checks it still is).
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue."
ENGINE_DEAD_RETRY_AFTER_S = 5


def engine_dead_response() -> JSONResponse:
    """503 + Retry-After for a request whose engine died under it (vLLM answers 500).

    The condition is temporary: a merged model's engine is restarted (server/merge/supervisor.py) and a dead
    base engine makes the server exit for its supervisor to restart (server/engine/watchdog.py).
    """
    return error_response(
        HTTPStatus.SERVICE_UNAVAILABLE,
        "the engine serving this model died during the request; it is being restarted (a merged model's engine "
        f"in this server, the base engine with the server): retry in {ENGINE_DEAD_RETRY_AFTER_S} s",
        headers={"Retry-After": str(ENGINE_DEAD_RETRY_AFTER_S)},
    )


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none", "list", "dict"})


def _param_of(loc: tuple) -> str | None:
    """``("body", "max_tokens")`` -> ``"max_tokens"``; nested locations are dotted."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path")]
    # Union members add their type name to the location; drop those.
    parts = [
        p for p in parts if p not in _TYPE_NAMES and not p.startswith(("function-", "constrained-", "list[", "dict["))
    ]
    return ".".join(parts) or None


ECHO_MAX = 200  # characters of a bad value echoed back in a 400 message


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if not isinstance(first, dict):  # vLLM's content-type check passes plain strings
        return error_response(400, str(first))
    if first.get("type") == "json_invalid":  # loc is ("body", <character offset>)
        where = first.get("loc", ("body", "?"))[-1]
        return error_response(
            400, f"Request body is not valid JSON ({first.get('msg', 'decode error')} at character {where})"
        )
    # A model-level validator fails at loc ("body",); its message may still start with the field's name.
    param = _param_of(tuple(first.get("loc", ()))) or param_named_in(
        str(first.get("msg", "")).removeprefix("Value error, ")
    )
    where = f"'{param}'" if param else "request body"
    message = f"Invalid {where}: {first.get('msg', 'invalid value')}"
    if "input" in first and param and not isinstance(first["input"], dict | list):
        got = repr(first["input"])
        message += f" (got {got if len(got) <= ECHO_MAX else got[:ECHO_MAX] + f'... ({len(got)} characters)'})"
    elif not param and first.get("type") in ("model_attributes_type", "dict_type"):
        message += "; send a JSON object with content-type: application/json"
    return error_response(400, message, param)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param)


async def _vllm_error(_: Request, exc: Exception) -> JSONResponse:
    # vLLM's own classification of its typed errors (client 4xx with the
    # parameter named, not-found 404, server 5xx), re-issued in our envelope.
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        return engine_dead_response()
    return from_vllm(create_error_response(exc))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Internals (paths, tensors) stay in the log, not in the response.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, f"Internal server error ({type(exc).__name__}); see the server log")


def install_error_handlers(app: FastAPI) -> None:
    """Register the one exception-to-envelope mapping on ``app``."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ApiError, _api_error)
    from vllm.exceptions import VLLMError

    app.add_exception_handler(VLLMError, _vllm_error)
    # vLLM's serving layer still raises plain ValueError/TypeError/OverflowError
    # for bad requests (e.g. an empty prompt list); vLLM's own server maps them
    # to 400 with the same function, and so do we.
    for exc_type in (ValueError, TypeError, OverflowError):
        app.add_exception_handler(exc_type, _vllm_error)
    app.add_exception_handler(Exception, _unexpected)
