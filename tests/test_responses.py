"""The stream rules of server/api/responses.py on fake vLLM results (the real server is in test_openai_field_grade)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from fastapi.responses import JSONResponse, StreamingResponse

from server.api.responses import respond

ERROR_400 = 'data: {"error": {"message": "Token id 9 is out of vocabulary", "type": "BadRequestError", "param": null, "code": 400}}\n\n'


def _events(*events: str):
    closed = []

    async def gen():
        try:
            for e in events:
                yield e
        finally:
            closed.append(True)

    return gen(), closed


def _streamed(gen, request) -> tuple[StreamingResponse, list[str]]:
    """``respond`` and the whole body, in one event loop (the generator lives in it)."""

    async def go():
        response = await respond(gen, request)
        return response, [chunk async for chunk in response.body_iterator]

    return asyncio.run(go())


def test_an_error_as_the_first_event_is_the_http_error_and_the_stream_is_closed():
    gen, closed = _events(ERROR_400, "data: [DONE]\n\n")
    r = asyncio.run(respond(gen, SimpleNamespace()))
    assert isinstance(r, JSONResponse) and r.status_code == 400
    body = json.loads(r.body)
    assert body["error"]["type"] == "invalid_request_error" and "out of vocabulary" in body["error"]["message"]
    assert closed == [True]


def test_an_error_after_tokens_stays_an_event_with_the_envelope_type():
    first = 'data: {"choices": [{"text": "a"}]}\n\n'
    gen, _ = _events(first, ERROR_400.replace("400", "500"), "data: [DONE]\n\n")
    r, events = _streamed(gen, SimpleNamespace())
    assert isinstance(r, StreamingResponse) and r.status_code == 200
    assert events[0] == first and events[-1] == "data: [DONE]\n\n"
    error = json.loads(events[1][len("data: ") :])["error"]
    assert error["code"] == 500 and error["type"] == "server_error"


def test_echo_with_max_tokens_0_counts_no_completion_tokens_in_the_stream():
    usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
    gen, _ = _events(
        'data: {"choices": [{"text": "Call me"}]}\n\n', f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
    )
    _, events = _streamed(gen, SimpleNamespace(echo=True, max_tokens=0))
    last = json.loads(events[-1][len("data: ") :])
    assert last["usage"] == {"prompt_tokens": 9, "completion_tokens": 0, "total_tokens": 9}
