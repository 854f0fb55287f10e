"""The exception-to-envelope mapping of server/errors.py for a dead engine (the rest goes through real servers)."""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus

from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.v1.engine.exceptions import EngineDeadError

from server.errors import ENGINE_DEAD_MESSAGE, _vllm_error, from_vllm


def _body(response) -> dict:
    return json.loads(response.body)["error"]


def test_vllm_engine_dead_message_is_the_one_we_match():
    assert str(EngineDeadError()).startswith(ENGINE_DEAD_MESSAGE)  # fails if vLLM rewords it


def test_a_dead_engine_is_503_with_retry_after_raised_or_returned():
    raised = asyncio.run(_vllm_error(None, EngineDeadError()))
    returned = from_vllm(create_error_response(EngineDeadError()))  # what vLLM's handlers return instead
    for r in (raised, returned):
        assert r.status_code == HTTPStatus.SERVICE_UNAVAILABLE and r.headers["retry-after"] == "5"
        err = _body(r)
        assert err["code"] == 503 and err["type"] == "service_unavailable_error" and "retry" in err["message"]


def test_other_server_errors_keep_their_status():
    r = from_vllm(create_error_response(RuntimeError("boom"), status_code=HTTPStatus.INTERNAL_SERVER_ERROR))
    assert r.status_code == 500 and "boom" in _body(r)["message"]
