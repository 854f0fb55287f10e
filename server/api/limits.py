"""Request limits and overload: body size, ``n``, and the bounded queue (429 with Retry-After).

What vLLM already checks is left to vLLM (its messages name the limit and reach clients in our
envelope): prompt length against ``max_model_len`` and ``max_tokens`` against the room left in
the context (400, ``param`` ``max_tokens`` / ``input_tokens``). Adapter uploads are limited by
``--max-adapter-bytes`` in the adapter registry (413). This module adds:

- :class:`BodyLimit`: request bodies over ``--max-request-bytes`` (uploads: ``--max-adapter-bytes``
  plus multipart overhead) get 413 before the body is read;
- :class:`AdmissionGate`: at most ``max_num_seqs + max_queue`` generation requests in the server
  at once; past that 429 with ``Retry-After`` instead of unbounded latency;
- :func:`check_sampling`: ``n`` over ``--max-n`` is 400 naming ``n``.
"""

from __future__ import annotations

from server.errors import BadRequest, send_envelope
from server.settings import Settings

GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
UPLOAD_PATH = "/v1/adapters"
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # form boundaries, headers and the name field


class _TooLarge(Exception):
    pass


def body_limit(path: str, settings: Settings) -> int:
    """The largest request body (bytes) accepted on ``path``."""
    if path == UPLOAD_PATH:
        return settings.max_adapter_bytes + MULTIPART_OVERHEAD_BYTES
    return settings.max_request_bytes


class BodyLimit:
    """Pure ASGI middleware: 413 for a body over :func:`body_limit`.

    A declared ``Content-Length`` over the limit is refused before reading (uvicorn never
    delivers more than the declared length). A chunked body is buffered up to the limit,
    then replayed to the app; one byte over is refused.
    """

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        limit = body_limit(scope["path"], self.settings)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await _too_large(send, limit, length.decode("latin-1"))
            return await self.app(scope, receive, send)
        try:
            messages = await _buffer(receive, limit)
        except _TooLarge:
            return await _too_large(send, limit, "more")
        replay = iter(messages)

        async def receive_replayed():
            return next(replay, None) or await receive()

        return await self.app(scope, receive_replayed, send)


async def _buffer(receive, limit: int) -> list[dict]:
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        size += len(message.get("body", b""))
        if size > limit:
            raise _TooLarge
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


async def _too_large(send, limit: int, got: str) -> None:
    await send_envelope(
        send,
        413,
        f"request body is {got} bytes; the limit is {limit} bytes (--max-request-bytes; uploads: --max-adapter-bytes)",
    )


class AdmissionGate:
    """Pure ASGI middleware bounding the generation requests inside the server.

    ``capacity = max_num_seqs + max_queue`` requests (each counted once, whatever its ``n``)
    may be running or waiting in the engine; one more gets 429 with ``Retry-After:
    retry_after_s``. A request leaves the count when its response ends, including a
    stream whose client went away (vLLM aborts it then).
    """

    def __init__(self, app, settings: Settings) -> None:
        self.app = app
        self.capacity = settings.max_num_seqs + settings.max_queue
        self.retry_after_s = settings.retry_after_s
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.capacity:
            return await send_envelope(
                send,
                429,
                f"server is at capacity: {self.in_flight} generation requests in progress, the limit is "
                f"{self.capacity} (--max-num-seqs + --max-queue); retry after {self.retry_after_s} s",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def check_sampling(n: int | None, settings: Settings) -> None:
    """Refuse sampling parameters over our limits.

    Raises:
        BadRequest: ``n`` over ``settings.max_n`` (param ``n``).
    """
    if n is not None and n > settings.max_n:
        raise BadRequest(f"n is {n}; the limit is {settings.max_n} choices per request (--max-n)", param="n")
